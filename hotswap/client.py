"""The Python client (the RPC) of a running hotswap service: roll, promote, rollback, status.

It reaches the Ray cluster at ``RAY_ADDRESS`` (or the local one) and the application's
controller actor by name. Operations block until the rollout ends; ``on_event`` receives
each per-replica progress line as it happens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from hotswap.controller import CONTROLLER_NAMESPACE, get_controller
from hotswap.errors import ControllerNotFoundError, HotswapError
from hotswap.signing import check_pin

__all__ = ["HotswapClient"]


class HotswapClient:
    """Talk to the controller of application ``app`` (the ``name`` in the Serve config; default ``hotswap``)."""

    def __init__(self, app: str = "hotswap", *, address: str | None = None) -> None:
        import ray

        if not ray.is_initialized():
            target = address or os.environ.get("RAY_ADDRESS") or "auto"
            try:
                ray.init(address=target, namespace=CONTROLLER_NAMESPACE, logging_level=logging.ERROR,
                         log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise ControllerNotFoundError(
                    f"no running Ray cluster at {target!r}; start the service (serve run serve_config.yaml) or "
                    "set RAY_ADDRESS to its cluster"
                ) from e
        self.app = app
        self.actor = get_controller(app)

    def roll(
        self,
        uri: str,
        *,
        canary: float | None = None,
        sha256: str | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> dict:
        """Fetch, validate and stage ``uri`` once, then move every replica (or ``canary`` percent) to it.

        ``sha256`` pins the weights: the controller refuses the roll unless the fetched
        ``adapter_model.safetensors`` has this sha256 (64 lowercase hex digits; :class:`ConfigError` otherwise).
        """
        pin = None if sha256 is None else check_pin(sha256)
        return self._follow(self.actor.roll.remote(uri, canary, expected_sha256=pin), on_event)

    def promote(self, *, on_event: Callable[[str], None] | None = None) -> dict:
        """The canary version goes to every replica and becomes stable."""
        return self._follow(self.actor.promote.remote(), on_event)

    def rollback(self, *, on_event: Callable[[str], None] | None = None) -> dict:
        """Canary active: its replicas return to stable; otherwise all return to the previous stable version."""
        return self._follow(self.actor.rollback.remote(), on_event)

    def status(self) -> dict:
        """Per replica what it runs (URI, sha256, swaps, last swap ms, compiled graphs); stable, canary, history."""
        return self._get(self.actor.status.remote())

    def _follow(self, ref, on_event) -> dict:
        import ray

        printed = 0
        while True:
            ready, _ = ray.wait([ref], timeout=0.2)
            if ready:
                break
            if on_event is not None:
                rollout = self.status().get("rollout")
                events = rollout["events"] if rollout else []
                for line in events[printed:]:
                    on_event(line)
                printed = len(events)
        result = self._get(ref)
        if on_event is not None:
            for line in result.get("events", [])[printed:]:
                on_event(line)
        return result

    @staticmethod
    def _get(ref):
        import ray

        from hotswap.errors import unwrap

        try:
            return ray.get(ref)
        except Exception as e:  # noqa: BLE001 - Ray's wrappers: our own error inside, or a dead controller
            cause = unwrap(e)
            if isinstance(cause, HotswapError):
                raise cause from None
            raise
