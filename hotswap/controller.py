"""The rollout controller: one named, detached Ray actor per application, the single source of truth.

It fetches and validates an adapter version once, stages its tensors once per replica dtype
in the Ray object store, and moves replicas to it in a stable rolling order, one replica (or
``rollout_batch_size``) at a time, waiting for each to drain, swap, smoke-check and ack. On
any failure it puts the replicas already moved back on their previous version and records
the version as rejected.

Replicas pull: a replica registers before it serves and gets its assignment; afterwards it
long-polls :meth:`HotswapController.watch`, which returns as soon as its assignment changes
(and doubles as a heartbeat carrying its stats). A rollout step is therefore "change one
replica's assignment, persist, wait until that replica reports running it".

A canary keeps its share when its replicas die: once a canary replica is gone, the controller
moves a live stable replica to the canary (a one-replica canary step, swapped in place like any
other); replicas that start meanwhile start on stable.

Every state change is persisted before it is acted on, so a restarted controller resumes a
rollout: replicas that already run the target version are not swapped again, and versions
already validated are reloaded from the content-addressed cache without validating them again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from hotswap.errors import (
    AdapterError,
    AdapterValidationError,
    ControllerNotFoundError,
    HotswapError,
    RolloutConflictError,
    RolloutError,
)
from hotswap.settings import HotswapSettings
from hotswap.state import BASE, ControllerState, Rollout, Version, state_store_for

__all__ = [
    "CONTROLLER_NAMESPACE",
    "HotswapController",
    "canary_count",
    "controller_name",
    "get_controller",
    "get_or_create_controller",
]

logger = logging.getLogger(__name__)

CONTROLLER_NAMESPACE = "hotswap"
_WATCH_TIMEOUT_S = 5.0
_UPKEEP_S = 2.0  # how often the controller checks that an active canary still has its replicas


def canary_count(percent: float, replicas: int) -> int:
    """Replicas a canary of ``percent`` moves: the most whose share does not exceed ``percent``, at least one.

    34% of 3 replicas is one replica (33%), never two (67%): a canary never gets more
    traffic than asked for, except the minimum of one replica.
    """
    return min(replicas, max(1, math.floor(percent * replicas / 100 + 1e-9)))


def controller_name(app_name: str) -> str:
    return f"hotswap-controller-{app_name}"


def get_or_create_controller(settings: HotswapSettings, app_name: str):
    """The application's controller actor, created (detached, restarted on failure) if it does not exist."""
    import ray

    cls = ray.remote(HotswapController)
    return cls.options(
        name=controller_name(app_name),
        namespace=CONTROLLER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
    ).remote(settings, app_name)


def get_controller(app_name: str):
    """The running controller of ``app_name``; :class:`ControllerNotFoundError` if there is none."""
    import ray

    try:
        return ray.get_actor(controller_name(app_name), namespace=CONTROLLER_NAMESPACE)
    except ValueError as e:
        raise ControllerNotFoundError(
            f"no hotswap controller for application '{app_name}' in this Ray cluster; start the service "
            "(serve run serve_config.yaml) or pass the application name with --app"
        ) from e


@dataclass
class _Replica:
    id: str
    dtype: str
    running: Version
    stats: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    failure: tuple[Version, str] | None = None  # the last failed swap reported


class HotswapController:
    """Rollout logic; run as a Ray actor (:func:`get_or_create_controller`). Methods are its RPC surface."""

    def __init__(self, settings: HotswapSettings, app_name: str) -> None:
        from hotswap.adapters import model_spec_for
        from hotswap.store import AdapterFetcher

        self.settings = settings
        self.app_name = app_name
        self.store = state_store_for(settings, app_name)
        self.state = self.store.load() or ControllerState()
        self.spec = model_spec_for(settings)
        self.fetcher = AdapterFetcher.from_settings(settings)
        self.replicas: dict[str, _Replica] = {}
        self.started = time.monotonic()
        self._validated: dict[Version, object] = {}  # version -> ValidatedAdapter (this process)
        self._staged: dict[tuple[Version, str], object] = {}  # (version, dtype) -> ObjectRef of StagedAdapter
        self._changed: asyncio.Condition | None = None
        self._busy: asyncio.Lock | None = None
        self._ready: asyncio.Task | None = None
        self._upkeeper: asyncio.Task | None = None  # held so the running task is not garbage-collected
        self._refill_failed: Version | None = None
        logger.info("controller for %s started; state at %s", app_name, self.store.describe())

    # --- start-up --------------------------------------------------------------------------------------

    async def _ensure_ready(self) -> None:
        if self._ready is None:
            self._changed = asyncio.Condition()
            self._busy = asyncio.Lock()
            self._ready = asyncio.ensure_future(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> None:
        initial = self.settings.initial_adapter
        if self.state.stable == BASE and not self.state.history and initial and self.state.initial_adapter is None:
            version = await self._validate(initial)  # a bad initial adapter fails every replica's start, loudly
            self.state.stable = version
            self.state.initial_adapter = initial
            self._record("initial", version, "ok", [], 0.0)
            self._save()
        elif initial and self.state.initial_adapter not in (None, initial):
            logger.warning("config initial_adapter %s ignored: the state says stable is %s", initial,
                           self.state.stable.short())
        if self.state.rollout is not None:
            rollout = self.state.rollout
            logger.info("resuming rollout %s (%s to %s), %d of %d done", rollout.id, rollout.kind,
                        rollout.version.short(), len(rollout.done), len(rollout.targets))
            asyncio.ensure_future(self._resume(rollout))
        self._upkeeper = asyncio.ensure_future(self._upkeep())

    async def _resume(self, rollout: Rollout) -> None:
        async with self._busy:
            try:
                await self._run(rollout)
            except HotswapError as e:
                logger.error("resumed rollout %s failed: %s", rollout.id, e)

    # --- versions ------------------------------------------------------------------------------------

    async def _validate(self, uri: str) -> Version:
        """Fetch ``uri`` and validate it, once per version (URI + sha256); remember rejections in the state.

        The fetch always runs (the content at a URI may have changed; its sha256 says so);
        validation is skipped for a version that was already validated.
        """
        from hotswap.adapters import resolve_adapter_uri, validate_fetched

        fetched = await asyncio.to_thread(self.fetcher.fetch, resolve_adapter_uri(uri, self.settings))
        version = Version(fetched.uri, fetched.sha256)
        if version in self._validated or _key(version) in self.state.validated:
            return version
        try:
            validated = await asyncio.to_thread(validate_fetched, fetched, settings=self.settings, spec=self.spec)
        except AdapterValidationError as e:
            self.state.rejected[uri] = {"uri": uri, "problems": e.problems, "time": time.time()}
            self._record("rejected", Version(uri, ""), "rejected", [], 0.0, reason=str(e))
            self._save()
            raise
        self._validated[version] = validated
        self.state.validated[_key(version)] = validated.record()
        return version

    async def _staged_ref(self, version: Version, dtype: str):
        """The object-store ref of ``version`` staged for ``dtype``; staged at most once per (version, dtype).

        Keyed by the whole identity, URI and sha256: the same weights under another URI may come with
        another adapter_config.json (another alpha), so they are another version.
        """
        import ray
        import torch

        from hotswap.staging import stage_adapter
        from hotswap.validation import load_validated

        if version == BASE:
            return None
        key = (version, dtype)
        if key not in self._staged:
            validated = self._validated.get(version)
            if validated is None:  # validated before a restart: reload from the cache, trusting the record
                record = self.state.validated[_key(version)]
                path = self.fetcher.cache.path_for(version.sha256)
                if not path.exists():
                    path = (await asyncio.to_thread(self.fetcher.fetch, version.uri)).weights_path
                validated = await asyncio.to_thread(load_validated, path, record, self.spec)
                self._validated[version] = validated
            staged = await asyncio.to_thread(stage_adapter, validated, self.spec, dtype=getattr(torch, dtype),
                                             pin_memory=False)
            self._staged[key] = ray.put(staged)
        return self._staged[key]

    # --- replica protocol ------------------------------------------------------------------------------

    async def register(self, replica_id: str, dtype: str, spec_fingerprint: str, stats: dict) -> dict:
        """A replica starting: record it and return the assignment it must run before it serves."""
        await self._ensure_ready()
        if spec_fingerprint != self.spec.fingerprint:
            raise RolloutConflictError(
                f"replica {replica_id} has another model layout than this controller (settings changed without "
                f"a restart?); restart the application so that controller and replicas agree"
            )
        replica = self.replicas.setdefault(replica_id, _Replica(replica_id, dtype, BASE))
        self._seen(replica, stats)
        if replica_id not in self.state.assignments:
            rollout = self.state.rollout
            moving = rollout is not None and rollout.kind in ("roll", "promote")
            version = rollout.version if moving else self.state.stable
            if moving:  # joins the rollout as already done, so a revert covers it too
                rollout.previous[replica_id] = self.state.stable
                rollout.targets.append(replica_id)
                rollout.done.append(replica_id)
            self.state.assignments[replica_id] = version
            self._save()
        logger.info("replica %s registered; assigned %s", replica_id, self.state.assignments[replica_id].short())
        return await self._assignment(replica_id)

    async def watch(self, replica_id: str, dtype: str, stats: dict) -> dict | None:
        """Long-poll: return the replica's assignment once it differs from what it runs (or None on timeout).

        ``stats`` (what :meth:`ModelReplica.stats` returns) name the adapter the replica runs.
        """
        await self._ensure_ready()
        replica = self.replicas.get(replica_id)
        if replica is None:  # known to a previous controller process: adopt it
            replica = self.replicas[replica_id] = _Replica(replica_id, dtype, _running(stats))
            self.state.assignments.setdefault(replica_id, replica.running)
        self._seen(replica, stats)
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.state.assignments.get(replica_id) != replica.running),
                    timeout=_WATCH_TIMEOUT_S,
                )
            except asyncio.TimeoutError:
                return None
        return await self._assignment(replica_id)

    async def ack(self, replica_id: str, version: dict, ok: bool, message: str, stats: dict) -> None:
        """A replica reports the outcome of applying ``version``; ``stats`` say what it runs now."""
        replica = self.replicas.get(replica_id)
        if replica is None:
            return
        if not ok:
            replica.failure = (Version.of(version), message)
        self._seen(replica, stats)

    def _seen(self, replica: _Replica, stats: dict) -> None:
        """A replica reported in: record what it runs (named by its stats), its stats, and when."""
        replica.running, replica.stats, replica.last_seen = _running(stats), stats, time.monotonic()
        if self._changed is not None:
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _assignment(self, replica_id: str) -> dict:
        version = self.state.assignments[replica_id]
        dtype = self.replicas[replica_id].dtype
        return {"uri": version.uri, "sha256": version.sha256, "staged": [await self._staged_ref(version, dtype)]}

    def _live(self) -> list[str]:
        horizon = time.monotonic() - self.settings.replica_liveness_s
        return sorted(r.id for r in self.replicas.values() if r.last_seen >= horizon)

    def _canary_vacancies(self) -> list[str]:
        """Canary replicas not heard from for ``replica_liveness_s`` (none until this process has run that long,
        since replicas known to a previous controller process report in only at their next heartbeat)."""
        if time.monotonic() - self.started <= self.settings.replica_liveness_s:
            return []
        live = set(self._live())
        return [r for r in self.state.canary_replicas if r not in live]

    async def _upkeep(self) -> None:
        """Forever: keep an active canary's share (see :meth:`_refill_canary`)."""
        while True:
            await asyncio.sleep(_UPKEEP_S)
            try:
                await self._refill_canary()
            except RolloutError as e:  # reverted and recorded; _refill_failed stops it trying other replicas
                logger.error("could not restore the canary's share: %s", e)
            except Exception:
                logger.exception("canary upkeep failed; retrying in %.0f s", _UPKEEP_S)

    async def _refill_canary(self) -> dict | None:
        """If canary replicas are gone, move as many live stable replicas to the canary."""
        s = self.state
        if s.canary is None or s.rollout is not None or self._busy.locked():
            return None
        if s.canary == self._refill_failed:
            return None  # a refill of this canary failed and was reverted: do not try it on replica after replica
        async with self._busy:
            vacant = self._canary_vacancies()
            stable = [r for r in self._live() if self.state.assignments.get(r) == s.stable]
            if not vacant or not stable or s.rollout is not None:
                return None
            moved = stable[-len(vacant):]
            logger.info("canary replicas %s are gone; moving %s to the canary %s", vacant, moved, s.canary.short())
            s.canary_replicas = [r for r in s.canary_replicas if r not in vacant]
            try:
                return await self._start_rollout("canary", s.canary, moved)
            except RolloutError:
                self._refill_failed = s.canary
                raise

    # --- operations ----------------------------------------------------------------------------------

    async def roll(self, uri: str, canary_percent: float | None = None) -> dict:
        """Validate ``uri`` once, then move every replica (or a canary share of them) to it."""
        await self._ensure_ready()
        self._refuse_if_busy()
        async with self._busy:
            if canary_percent is not None:
                if not 0 < canary_percent <= 100:
                    raise RolloutConflictError(f"--canary must be in (0, 100], got {canary_percent}")
                if self.state.canary is not None:
                    raise RolloutConflictError(
                        f"canary {self.state.canary.short()} is active; promote or rollback it first"
                    )
            version = await self._validate(uri)
            live = self._live()
            if not live:
                raise RolloutConflictError("no live replicas are registered; is the service running?")
            if canary_percent is None:
                return await self._start_rollout("roll", version, live)
            return await self._start_rollout("canary", version, live[: canary_count(canary_percent, len(live))])

    async def promote(self) -> dict:
        """Move every replica to the canary version, which becomes stable."""
        await self._ensure_ready()
        self._refuse_if_busy()
        async with self._busy:
            if self.state.canary is None:
                raise RolloutConflictError("no canary is active; start one with 'hotswap roll URI --canary PERCENT'")
            return await self._start_rollout("promote", self.state.canary, self._live())

    async def rollback(self) -> dict:
        """Canary active: its replicas return to stable. Otherwise every replica returns to the previous stable."""
        await self._ensure_ready()
        self._refuse_if_busy()
        async with self._busy:
            if self.state.canary is not None:
                return await self._start_rollout("rollback", self.state.stable, self._live())
            if not self.state.previous_stable:
                raise RolloutConflictError(
                    f"nothing to roll back to: {self.state.stable.short()} is the first stable version"
                )
            return await self._start_rollout("rollback", self.state.previous_stable[-1], self._live())

    def _refuse_if_busy(self) -> None:
        rollout = self.state.rollout
        if rollout is not None or self._busy.locked():
            what = f"{rollout.kind} of {rollout.version.short()} ({len(rollout.done)}/{len(rollout.targets)} " \
                   f"replicas done)" if rollout else "another operation"
            raise RolloutConflictError(f"a rollout is in progress: {what}; wait for it to finish")

    async def _start_rollout(self, kind: str, version: Version, replicas: list[str]) -> dict:
        targets = [r for r in replicas if self.state.assignments.get(r) != version]
        rollout = Rollout(
            id=uuid.uuid4().hex[:8], kind=kind, version=version, targets=targets,
            previous={r: self.state.assignments.get(r, self.state.stable) for r in targets},
        )
        self.state.rollout = rollout
        self._save()
        return await self._run(rollout)

    async def _run(self, rollout: Rollout) -> dict:
        started = time.monotonic()
        step = self.settings.rollout_batch_size
        pending = [r for r in rollout.targets if r not in rollout.done]
        try:
            for i in range(0, len(pending), step):
                await self._move(rollout, pending[i : i + step])
        except RolloutError as e:
            await self._revert(rollout, str(e))
            raise
        elapsed_ms = (time.monotonic() - started) * 1e3
        self._finish(rollout, elapsed_ms)
        return {"id": rollout.id, "kind": rollout.kind, "version": _v(rollout.version), "swapped": rollout.done,
                "ms": round(elapsed_ms, 1), "events": rollout.events}

    async def _move(self, rollout: Rollout, batch: list[str]) -> None:
        for r in batch:
            self.state.assignments[r] = rollout.version
            if r in self.replicas:
                self.replicas[r].failure = None
        self._save()
        await self._notify()
        started = time.monotonic()
        outcome = await self._await_running(batch, rollout.version)
        for r, result in outcome.items():
            if result == "ok":
                rollout.done.append(r)
                self._event(rollout, f"{r}: {rollout.version.short()} in {(time.monotonic() - started) * 1e3:.0f} ms"
                                     f" (swap {self.replicas[r].stats.get('last_swap_ms') or 0:.2f} ms)")
            elif result == "gone":
                rollout.done.append(r)  # its replacement registers and is assigned the right version
                self._event(rollout, f"{r}: gone (replica stopped); its replacement will start on the "
                                     "assigned version")
        self._save()
        failed = {r: v for r, v in outcome.items() if v not in ("ok", "gone")}
        if failed:
            reasons = "; ".join(f"replica {r}: {v}" for r, v in failed.items())
            raise RolloutError(f"{rollout.kind} of {rollout.version.short()} failed: {reasons}")

    async def _await_running(self, replicas: list[str], version: Version) -> dict[str, str]:
        """Wait until each replica reports running ``version``, reports a failure, is gone, or times out."""
        deadline = time.monotonic() + self.settings.swap_timeout_s
        outcome: dict[str, str] = {}

        def settle() -> bool:
            now = time.monotonic()
            liveness = self.settings.replica_liveness_s
            for r in replicas:
                if r in outcome:
                    continue
                replica = self.replicas.get(r)
                if replica is not None and replica.running == version:
                    outcome[r] = "ok"
                elif replica is not None and replica.failure and replica.failure[0] == version:
                    outcome[r] = replica.failure[1]
                elif (replica is None and now - self.started > liveness) or (
                        replica is not None and now - replica.last_seen > liveness):
                    outcome[r] = "gone"
                elif now > deadline:
                    outcome[r] = f"no answer within swap_timeout_s={self.settings.swap_timeout_s}"
            return len(outcome) == len(replicas)

        async with self._changed:
            while not settle():
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
        return outcome

    async def _revert(self, rollout: Rollout, reason: str) -> None:
        """Put every replica the rollout moved (or tried to) back on its previous version."""
        moved = [r for r in rollout.targets if self.state.assignments.get(r) == rollout.version]
        for r in moved:
            self.state.assignments[r] = rollout.previous.get(r, self.state.stable)
        self._event(rollout, f"reverting {len(moved)} replicas: {reason}")
        self._save()
        await self._notify()
        by_version: dict[Version, list[str]] = {}
        for r in moved:
            by_version.setdefault(self.state.assignments[r], []).append(r)
        for version, replicas in by_version.items():
            outcome = await self._await_running(replicas, version)
            bad = {r: v for r, v in outcome.items() if v not in ("ok", "gone")}
            if bad:
                logger.error("revert of %s left replicas %s: %s", rollout.version.short(), list(bad), bad)
        if rollout.kind in ("roll", "canary"):
            self.state.rejected[rollout.version.sha256 or rollout.version.uri] = {
                "uri": rollout.version.uri, "problems": [reason], "time": time.time()}
        self._record(rollout.kind, rollout.version, "reverted", rollout.targets, 0.0, reason=reason)
        self.state.rollout = None
        self._save()

    def _finish(self, rollout: Rollout, elapsed_ms: float) -> None:
        s = self.state
        if rollout.kind == "roll":
            if s.stable != rollout.version:
                s.previous_stable.append(s.stable)
            s.stable, s.canary, s.canary_replicas = rollout.version, None, []
        elif rollout.kind == "canary":
            s.canary = rollout.version
            # the canary share: the replicas moved now plus live ones that already ran it
            s.canary_replicas = sorted(r for r in set(rollout.targets) | set(self._live())
                                       if s.assignments.get(r) == rollout.version)
        elif rollout.kind == "promote":
            s.previous_stable.append(s.stable)
            s.stable, s.canary, s.canary_replicas = rollout.version, None, []
        elif rollout.kind == "rollback":
            if s.canary is not None:
                s.canary, s.canary_replicas = None, []
            else:
                s.stable = s.previous_stable.pop()
        self._record(rollout.kind, rollout.version, "ok", rollout.targets, elapsed_ms)
        s.rollout = None
        self._save()
        logger.info("%s of %s done: %d replicas in %.0f ms", rollout.kind, rollout.version.short(),
                    len(rollout.targets), elapsed_ms)

    # --- status and bookkeeping --------------------------------------------------------------------------

    async def status(self) -> dict:
        await self._ensure_ready()
        live = set(self._live())
        replicas = []
        for r in sorted(self.replicas.values(), key=lambda x: x.id):
            assigned = self.state.assignments.get(r.id)
            replicas.append({
                "id": r.id,
                "adapter_uri": r.running.uri,
                "adapter_sha256": r.running.sha256,
                "swaps": r.stats.get("swaps"),
                "last_swap_ms": r.stats.get("last_swap_ms"),
                # the rest of the last swap: waiting for the batch in flight, then the smoke check
                "last_drain_ms": r.stats.get("last_drain_ms"),
                "last_smoke_ms": r.stats.get("last_smoke_ms"),
                "compiled_graphs": r.stats.get("compiled_graphs"),
                "pid": r.stats.get("pid"),
                "assigned_uri": assigned.uri if assigned else None,
                "assigned_sha256": assigned.sha256 if assigned else None,
                "live": r.id in live,
            })
        s = self.state
        return {
            "app": self.app_name,
            "state_store": self.store.describe(),
            "stable": _v(s.stable),
            "canary": _v(s.canary),
            "canary_replicas": s.canary_replicas,
            "rollout": s.rollout.to_dict() if s.rollout else None,
            "replicas": replicas,
            "history": s.history[-50:],
            "rejected": s.rejected,
        }

    def _event(self, rollout: Rollout, message: str) -> None:
        rollout.events.append(message)
        logger.info("rollout %s: %s", rollout.id, message)

    def _record(self, kind: str, version: Version, result: str, replicas: list[str], ms: float,
                reason: str | None = None) -> None:
        entry = {"time": time.time(), "kind": kind, "uri": version.uri, "sha256": version.sha256,
                 "result": result, "replicas": list(replicas), "ms": round(ms, 1)}
        if reason:
            entry["reason"] = reason
        self.state.history.append(entry)

    def _save(self) -> None:
        self.store.save(self.state)


def _running(stats: dict) -> Version:
    """The version a replica runs, as its stats name it."""
    return Version(stats["adapter_uri"], stats["adapter_sha256"])


def _key(version: Version) -> str:
    """A version's key in the persisted state (JSON keys are strings)."""
    return f"{version.sha256}@{version.uri}"


def _v(version: Version | None) -> dict | None:
    return None if version is None else {"uri": version.uri, "sha256": version.sha256}


def describe_error(error: BaseException) -> str:
    """One line for a CLI or HTTP error body, unwrapping Ray's task error around our own errors."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, (HotswapError, AdapterError)):
        return str(cause)
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
