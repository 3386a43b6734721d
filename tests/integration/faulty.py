"""A model replica with fault seams, driven by marker files under ``<cache_dir>/fault-marks`` (tests and the
replicas share the file system):

- ``hold-<replica id>``: the replica waits before its next swap (a test can act "mid-rollout");
- it writes ``swapping-<replica id>`` while a swap runs (including its wait for requests in flight);
- ``fail-<replica id>``: its smoke check fails;
- ``fail-step``: every model step raises (each request in the batch fails; the next step runs again);
- ``hold-request``: a request sent with ``seed == HOLD_SEED`` joins a row of the running batch (on
  the slot active then) and sits out every step before its first token, writing
  ``holding-<replica id>`` while it waits; the other rows keep running.

Every wait is bounded (60 s) so that a test that forgets a marker still ends.
"""

from __future__ import annotations

import threading
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
        engine = self.engine
        original = engine.submit
        replica_id = self.replica_id

        def release(ticket) -> None:
            holding = marks / f"holding-{replica_id}"
            holding.touch()
            try:
                _wait_while(marks / "hold-request")
            finally:
                holding.unlink(missing_ok=True)
                engine.scheduler.release(ticket)

        def submit(token_ids, params, **kwargs):
            hold = params.seed == HOLD_SEED and (marks / "hold-request").exists()
            # it joins a row (on the slot active then) and sits out every step until the mark is gone
            ticket = original(token_ids, params, held=hold, **kwargs)
            if hold:
                threading.Thread(target=release, args=(ticket,), daemon=True).start()
            return ticket

        engine.submit = submit
        forward = engine.scheduler.forward

        def failing_forward(**kwargs):
            if (marks / "fail-step").exists():
                raise RuntimeError("injected step failure")
            return forward(**kwargs)

        engine.scheduler.forward = failing_forward

    def _swap_and_check(self, staged):
        marks = Path(self.settings.cache_dir) / "fault-marks"
        _wait_while(marks / f"hold-{self.replica_id}")
        swapping = marks / f"swapping-{self.replica_id}"
        swapping.touch()
        try:
            return super()._swap_and_check(staged)
        finally:
            swapping.unlink(missing_ok=True)

    def _smoke_check(self, slot, *, timeout_s=None):
        if (Path(self.settings.cache_dir) / "fault-marks" / f"fail-{self.replica_id}").exists():
            raise RuntimeError("injected smoke-check failure")
        super()._smoke_check(slot, timeout_s=timeout_s)


FaultyReplica = serve.deployment(_FaultyReplica, name="ModelReplica", ray_actor_options={"num_cpus": 0.3},
                                 health_check_period_s=2, health_check_timeout_s=60)
