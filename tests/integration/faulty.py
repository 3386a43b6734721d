"""A model replica with fault seams, driven by marker files under ``<cache_dir>/fault-marks`` (tests and the
replicas share the file system):

- ``hold-<replica id>``: the replica waits before its next swap (a test can act "mid-rollout");
- it writes ``swapping-<replica id>`` while a swap runs (including its wait for requests in flight);
- ``fail-<replica id>``: its smoke check fails;
- ``hold-request``: a request sent with ``seed == HOLD_SEED`` stops inside the engine's request
  lock, before its first token, and writes ``holding-<replica id>`` while it waits.

Every wait is bounded (60 s) so that a test that forgets a marker still ends.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import serve

from deployments.replica import ModelReplica

HOLD_SEED = 424242
_WAIT_STEPS = 1200  # x 0.05 s = 60 s


def _wait_while(path: Path) -> None:
    for _ in range(_WAIT_STEPS):
        if not path.exists():
            return
        time.sleep(0.05)


class _FaultyReplica(ModelReplica.func_or_class):
    async def __init__(self, settings) -> None:
        await super().__init__(settings)
        marks = Path(settings.cache_dir) / "fault-marks"
        generator = self.engine.generator
        original = generator.stream
        replica_id = self.replica_id

        def stream(prompts, params, **kwargs):
            if any(p.seed == HOLD_SEED for p in params):  # runs under the engine's request lock
                holding = marks / f"holding-{replica_id}"
                holding.touch()
                try:
                    _wait_while(marks / "hold-request")
                finally:
                    holding.unlink(missing_ok=True)
            yield from original(prompts, params, **kwargs)

        generator.stream = stream

    def _swap_and_check(self, staged):
        marks = Path(self.settings.cache_dir) / "fault-marks"
        _wait_while(marks / f"hold-{self.replica_id}")
        swapping = marks / f"swapping-{self.replica_id}"
        swapping.touch()
        try:
            return super()._swap_and_check(staged)
        finally:
            swapping.unlink(missing_ok=True)

    def _smoke_check(self):
        if (Path(self.settings.cache_dir) / "fault-marks" / f"fail-{self.replica_id}").exists():
            raise RuntimeError("injected smoke-check failure")
        super()._smoke_check()


FaultyReplica = serve.deployment(_FaultyReplica, name="ModelReplica", ray_actor_options={"num_cpus": 0.3},
                                 health_check_period_s=2, health_check_timeout_s=60)
