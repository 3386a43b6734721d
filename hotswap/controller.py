"""The controller actor: a thin Ray wrapper that feeds events to the rollout state machine.

One named, detached actor per application *and settings generation*
(``hotswap-controller-<app>@<settings fingerprint>``): a redeploy with changed settings starts a
new controller with those settings, which takes over the persisted state (its first save fences
the old one) and retires the controllers of older generations. What it does:

- start-up: load the state, claim it, resume an operation in progress, and make the initial
  adapter stable, retrying with backoff until it can (``status`` says what it waits for);
- replicas: ``register`` (before a replica serves), ``watch`` (the long-poll that is also the
  heartbeat), ``heartbeat`` (sent while a replica swaps); each call carries a
  :class:`~hotswap.messages.ReplicaReport` and answers an :class:`~hotswap.messages.Assignment`;
- users: ``roll`` / ``promote`` / ``rollback`` / ``status``; an operation's version is resolved by
  the :class:`~hotswap.catalog.VersionCatalog` (fetch, pin, signature, validate), then handed to
  :class:`~hotswap.rollout.RolloutMachine`, which drives it from there;
- a one-second tick for deadlines, liveness and the canary's share.

Every transition the machine proposes is persisted before it is committed (write-ahead); a failed
save leaves memory equal to the persisted state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from hotswap.errors import (
    AdapterError,
    AdapterValidationError,
    ControllerNotFoundError,
    ControllerUnavailableError,
    HotswapError,
    RolloutConflictError,
    unwrap,
)
from hotswap.messages import Assignment, OpKind, ReplicaReport
from hotswap.rollout import Notify, Reply, RolloutMachine, Transition, canary_count
from hotswap.settings import HotswapSettings
from hotswap.state import DesiredState, state_store_for
from hotswap.versions import AdapterVersion

__all__ = [
    "CONTROLLER_NAMESPACE",
    "HotswapController",
    "canary_count",
    "controller_name",
    "describe_error",
    "get_controller",
    "get_or_create_controller",
    "lower_priority",
]

logger = logging.getLogger(__name__)

CONTROLLER_NAMESPACE = "hotswap"
_PREFIX = "hotswap-controller-"
_TICK_S = 1.0
_START_BACKOFF_S = (0.5, 10.0)  # first and longest wait between start-up attempts


def controller_name(app_name: str, settings: HotswapSettings) -> str:
    return f"{_PREFIX}{app_name}@{settings.fingerprint}"


def lower_priority(nice: int) -> int:
    """Give every thread of this process the CPU priority ``nice`` (never raise it above what it has: only a
    privileged process may); later threads inherit it from the thread that starts them. Returns the threads changed.

    Linux gives each thread its own nice value, so the process's threads are set one by one (``/proc/self/task``,
    read again until a pass changes nothing: a thread not yet set may start another meanwhile); elsewhere the call
    on the process sets them all. Without priorities (Windows) it does nothing."""
    import os

    if not hasattr(os, "setpriority"):
        return 0
    changed = 0
    for _ in range(5):
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            tids = [0]
        now = 0
        for tid in tids:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    now += 1
            except OSError:  # the thread ended meanwhile, or the platform refuses: it keeps its priority
                continue
        changed += now
        if not now:
            break
    return changed


def get_or_create_controller(settings: HotswapSettings, app_name: str):
    """The controller of ``app_name`` for exactly these settings, created (detached, restarted on failure)."""
    import ray

    cls = ray.remote(HotswapController)
    return cls.options(
        name=controller_name(app_name, settings),
        namespace=CONTROLLER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
    ).remote(settings, app_name)


def _controllers(app_name: str) -> list[str]:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(n["name"] for n in names if n["namespace"] == CONTROLLER_NAMESPACE
                  and n["name"].startswith(_PREFIX) and n["name"][len(_PREFIX):].rpartition("@")[0] == app_name)


def get_controller(app_name: str):
    """The current controller of ``app_name``; :class:`ControllerNotFoundError` if there is none.

    While a redeploy overlaps two settings generations, the one that is neither retired nor fenced and
    started last is the current one.
    """
    import ray

    handles = []
    for name in _controllers(app_name):
        try:
            handles.append(ray.get_actor(name, namespace=CONTROLLER_NAMESPACE))
        except ValueError:
            continue
    if not handles:
        raise ControllerNotFoundError(
            f"no hotswap controller for application '{app_name}' in this Ray cluster; start the service "
            "(serve run serve_config.yaml) or pass the application name with --app"
        )
    if len(handles) == 1:
        return handles[0]
    ranked = []
    for handle in handles:
        try:
            info = ray.get(handle.whoami.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a dead or stuck generation is simply not the current one
            continue
        ranked.append((not info["retired"] and not info["fenced"], info["started"], handle))
    if not ranked:
        return handles[0]
    return max(ranked, key=lambda t: t[:2])[2]


def _cluster_name() -> str | None:
    """The Ray cluster this controller runs in (its session name, new at every cluster start); None without Ray."""
    import ray

    return ray.get_runtime_context().get_session_name() if ray.is_initialized() else None


def _in_an_actor() -> bool:
    """Whether this runs in a Ray actor: not without Ray, nor in a driver that runs the controller's logic in process
    (as the unit tests do after the integration tests, Ray still connected: they must not read or write its GCS)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _restarted() -> bool:
    """Whether Ray restarted this controller actor (it ran in this cluster before); False outside an actor."""
    import ray

    return _in_an_actor() and bool(ray.get_runtime_context().was_current_actor_reconstructed)


_CLAIMED_KEY = "hotswap/claimed/"  # + the state object: written to the cluster's GCS at every claim


def _claimed_here_before(store: str) -> bool:
    """Whether a controller claimed the state object ``store`` in this Ray cluster before (a GCS key, which lives as
    long as the cluster). Its replicas may still serve here from what it assigned, unheard by a new controller, even
    if a controller in another cluster claimed the state since. False outside an actor."""
    if not _in_an_actor():
        return False
    from ray.experimental.internal_kv import _internal_kv_exists

    return bool(_internal_kv_exists(_CLAIMED_KEY + store, namespace="hotswap"))


def _mark_claimed(store: str) -> None:
    """Record in this cluster's GCS that a controller claimed ``store`` here (see :func:`_claimed_here_before`)."""
    if _in_an_actor():
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(_CLAIMED_KEY + store, b"1", overwrite=True, namespace="hotswap")


def describe_error(error: BaseException) -> str:
    """One line for a CLI or HTTP error body, unwrapping Ray's wrappers around our own errors."""
    error = unwrap(error)
    if isinstance(error, (HotswapError, AdapterError)):
        return str(error)
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


class HotswapController:
    """Run as a Ray actor (:func:`get_or_create_controller`); its public methods are the RPC surface."""

    def __init__(self, settings: HotswapSettings, app_name: str) -> None:
        from hotswap.adapters import model_spec_for
        from hotswap.catalog import VersionCatalog

        self.settings = settings
        self.app_name = app_name
        self.name = controller_name(app_name, settings)
        if settings.controller_nice and _in_an_actor():  # in its own process: not a caller's (a test's) process
            lower_priority(settings.controller_nice)
        self.store = state_store_for(settings, app_name)
        self.spec = model_spec_for(settings)
        self.catalog = VersionCatalog(settings, self.spec)
        self.started = time.time()
        self.sm: RolloutMachine | None = None
        self.waiting_for = "loading the state"
        self.retired: str | None = None
        self._ran_here: bool | None = None  # a controller of this state ran in this cluster before (see _start_once)
        self._dtypes: dict[str, str] = {}  # replica id -> dtype
        self._waiters: dict[str, asyncio.Future] = {}
        self._loop_objects: tuple[asyncio.Lock, asyncio.Condition, asyncio.Event] | None = None
        self._tasks: list[asyncio.Task] = []  # held so the running tasks are not garbage-collected

    # --- start-up ----------------------------------------------------------------------------------

    def _objects(self) -> tuple[asyncio.Lock, asyncio.Condition, asyncio.Event]:
        if self._loop_objects is None:  # created on the actor's event loop, on first use
            self._loop_objects = (asyncio.Lock(), asyncio.Condition(), asyncio.Event())
            self._tasks.append(asyncio.ensure_future(self._start()))
        return self._loop_objects

    async def _ready(self, timeout_s: float | None = None) -> None:
        _, _, ready = self._objects()
        try:
            await asyncio.wait_for(ready.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise ControllerUnavailableError(
                f"the hotswap controller of '{self.app_name}' is not ready: {self.waiting_for}"
            ) from None

    async def _start(self) -> None:
        """Load and claim the state, resume, make the initial adapter stable; retried until it works."""
        lock, _, ready = self._objects()
        delay = _START_BACKOFF_S[0]
        while True:
            try:
                await self._start_once()
                break
            except Exception as e:  # noqa: BLE001 - anything: retried, and shown by status
                self.waiting_for = f"{describe_error(e)} (retrying in {delay:.0f} s)"
                logger.warning("controller %s not ready: %s", self.name, self.waiting_for)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _START_BACKOFF_S[1])
        self.waiting_for = ""
        ready.set()
        self._tasks.append(asyncio.ensure_future(self._tick_forever()))
        self._tasks.append(asyncio.ensure_future(self._retire_others()))
        logger.info("controller %s ready; state at %s", self.name, self.store.describe())

    async def _start_once(self) -> None:
        lock, _, _ = self._objects()
        where = self.store.describe()
        # GCS queries: off the event loop the replicas' polls share. A controller ran here before if Ray restarted
        # this one, or if another (killed, or of an earlier deploy) claimed this state in this cluster. Asked once,
        # before this controller's own mark: a start retried after a failed claim must not find its own mark
        if self._ran_here is None:
            self._ran_here = (await asyncio.to_thread(_restarted)
                              or await asyncio.to_thread(_claimed_here_before, where))
        ran_here = self._ran_here
        async with lock:
            if self.sm is None:
                self.waiting_for = f"the state at {self.store.describe()}"
                state = await asyncio.to_thread(self.store.load) or DesiredState()
                sm = RolloutMachine(state, batch_size=self.settings.rollout_batch_size,
                                    swap_timeout_s=self.settings.swap_timeout_s,
                                    liveness_s=self.settings.replica_liveness_s,
                                    forget_after_s=self.settings.replica_liveness_s * 4,
                                    settle_s=2 * self.settings.watch_timeout_s, now=time.time(),
                                    new_id=lambda: uuid.uuid4().hex[:8], cluster=_cluster_name(),
                                    restarted=ran_here)
                # marked first: a mark whose claim then fails only costs a later controller here a settle wait
                await asyncio.to_thread(_mark_claimed, where)
                # claim the state: this save fences any other controller that still writes it
                await self._persist(sm, sm.claim(time.time()), raise_errors=True)
                self.sm = sm
        initial = self.settings.initial_adapter
        if initial and self.sm.needs_initial(initial):
            self.waiting_for = f"the initial adapter {initial}"
            version, record = await self.catalog.resolve(initial, known=self.sm.state.validated)
            async with lock:
                transition = self.sm.initialize(version, initial, time.time())
                if transition is not None:
                    transition.state.validated[version.key] = record
                    await self._persist(self.sm, transition, raise_errors=True)
        elif initial and self.sm.state.initial_adapter not in (None, initial):
            logger.warning("config initial_adapter %s ignored: the state says stable is %s", initial,
                           self.sm.state.stable.short())

    async def _retire_others(self) -> None:
        """Retire the controllers of this application's other settings generations (an older deploy)."""
        import ray

        for name in _controllers(self.app_name):
            if name == self.name:
                continue
            try:
                old = ray.get_actor(name, namespace=CONTROLLER_NAMESPACE)
                await old.retire.remote(f"superseded by {self.name} (a redeploy with other settings)")
            except Exception as e:  # noqa: BLE001 - already gone
                logger.info("could not retire %s: %s", name, e)

    async def _tick_forever(self) -> None:
        lock, _, _ = self._objects()
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                async with lock:
                    transition = self.sm.tick(time.time())
                    if transition is None and getattr(self.store, "unclear", False) and not self.sm.fenced:
                        # a save may have landed unseen (its caller was told it failed): what is stored may hold
                        # a state this controller never committed; store the one it holds, as soon as S3 answers
                        transition = Transition(self.sm.state.copy())
                    await self._persist(self.sm, transition)
                    s = self.sm.state
                    in_use = {s.stable, *([s.canary] if s.canary else [])}
                    if s.operation is not None:
                        in_use |= {s.operation.version, *s.operation.previous.values()}
                    self.catalog.keep(in_use)
            except Exception:  # noqa: BLE001 - the next tick tries again
                logger.exception("controller tick failed")

    # --- driving the machine -----------------------------------------------------------------------

    async def _persist(self, sm: RolloutMachine, transition: Transition | None, *, raise_errors: bool = False):
        """Save ``transition``'s state, then commit it (or fail it), then carry out the actions. Under the lock."""
        if transition is None:
            return
        try:
            await asyncio.to_thread(self.store.save, transition.state)
        except Exception as e:  # noqa: BLE001 - any save failure: the state stays as last persisted
            logger.error("controller %s could not save its state to %s: %s", self.name, self.store.describe(), e)
            actions = sm.fail(transition, e)
            self._carry_out(actions)
            if sm.fenced:  # no later save can land: answer every caller still waiting, now
                for op_id, waiter in self._waiters.items():
                    if not waiter.done():  # its operation was saved: the controller that took over resumes it
                        waiter.set_exception(ControllerUnavailableError(
                            f"the stored state changed under this controller while operation {op_id} ran here: "
                            f"another controller took it over (a redeploy, or a second controller), under which "
                            f"the operation goes on, or a late write of this one's landed; 'hotswap status' shows "
                            f"which and how it ends ({sm.fenced})"))
                self._waiters.clear()
            if raise_errors:
                raise
            return
        self._carry_out(sm.commit(transition))

    def _carry_out(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Reply):
                waiter = self._waiters.pop(action.op_id, None)
                if action.outcome.value not in ("ok", "preempted"):
                    logger.error("operation %s: %s", action.op_id, action.error or action.outcome.value)
                else:
                    logger.info("operation %s %s: %s in %.0f ms", action.op_id, action.result.get("kind"),
                                action.outcome.value, action.result.get("ms", 0))
                if waiter is not None and not waiter.done():
                    if action.error is not None:
                        waiter.set_exception(action.error)
                    else:
                        waiter.set_result(action.result)
            elif isinstance(action, Notify):
                self._tasks.append(asyncio.ensure_future(self._notify()))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _notify(self) -> None:
        _, changed, _ = self._objects()
        async with changed:
            changed.notify_all()

    async def _heard(self, report: ReplicaReport) -> None:
        if report.settings_fingerprint and report.settings_fingerprint != self.settings.fingerprint:
            raise RolloutConflictError(
                f"replica {report.replica_id} runs settings {report.settings_fingerprint}, this controller "
                f"{self.settings.fingerprint}; each settings generation has its own controller"
            )
        lock, _, _ = self._objects()
        self._dtypes[report.replica_id] = report.dtype
        async with lock:
            await self._persist(self.sm, self.sm.heard(report, time.time()))

    async def _assignment(self, replica_id: str) -> Assignment:
        """The replica's assignment with its staged ref; re-derived if it changed while the ref was staged
        (an operation may have turned to revert meanwhile: never hand out a stale one)."""
        while True:
            version, token = self.sm.assignment(replica_id), self.sm.token(replica_id)
            record = self.sm.state.validated.get(version.key)
            ref = await self.catalog.staged_ref(version, self._dtypes.get(replica_id, "float32"), record)
            if (self.sm.assignment(replica_id), self.sm.token(replica_id)) == (version, token):
                return Assignment(version, [ref], token)

    # --- replica protocol -----------------------------------------------------------------------------

    async def register(self, report: ReplicaReport) -> Assignment:
        """A replica starting: record it and return what it must run before it serves.

        Waits up to one watch timeout for the controller to be ready, then raises
        :class:`ControllerUnavailableError` naming what it waits for (the replica retries).
        """
        await self._ready(self.settings.watch_timeout_s)
        await self._heard(report)
        assignment = await self._assignment(report.replica_id)
        self.sm.registry.hand(report.replica_id, assignment.version, report.seq)
        logger.info("replica %s registered; assigned %s", report.replica_id, assignment.version.short())
        return assignment

    async def heartbeat(self, report: ReplicaReport) -> None:
        """A replica that is draining or swapping is alive (also its report after an apply)."""
        await self._ready(self.settings.watch_timeout_s)
        await self._heard(report)

    async def watch(self, report: ReplicaReport) -> Assignment | None:
        """Long-poll: the replica's assignment once it differs from what it runs, else ``None`` after the timeout.

        An assignment the replica reported failing (for the same token) is not offered again; the
        replica clears its failure report to ask for a retry.
        """
        await self._ready(self.settings.watch_timeout_s)
        if self.retired:
            await asyncio.sleep(self.settings.watch_timeout_s)
            return None
        await self._heard(report)
        _, changed, _ = self._objects()
        rid = report.replica_id

        def differs() -> bool:
            version = self.sm.assignment(rid)
            failed_it = report.failed == version and report.failed_token == self.sm.token(rid)
            return version != report.running and not failed_it

        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(differs), timeout=self.settings.watch_timeout_s)
            except asyncio.TimeoutError:
                return None
        try:
            assignment = await self._assignment(rid)
        except Exception as e:  # noqa: BLE001 - staging failed: logged, retried at the next watch
            logger.error("could not stage %s for replica %s: %s", self.sm.assignment(rid).short(), rid,
                         describe_error(e))
            return None
        # until a report sent after it is heard, the replica may be about to apply it (the revert waits for that)
        self.sm.registry.hand(rid, assignment.version, report.seq)
        return assignment

    # --- operations -----------------------------------------------------------------------------------

    async def roll(self, uri: str, canary_percent: float | None = None, *,
                   expected_sha256: str | None = None) -> dict:
        """Resolve ``uri`` once, then move every replica (or a canary share of them) to it."""
        kind = OpKind.ROLL if canary_percent is None else OpKind.CANARY
        return await self._operate(kind, uri, canary_percent, expected_sha256)

    async def promote(self) -> dict:
        """Move every replica to the canary version, which becomes stable."""
        return await self._operate(OpKind.PROMOTE, None, None, None)

    async def rollback(self) -> dict:
        """Canary active: its replicas return to stable. Otherwise every replica returns to the previous stable."""
        return await self._operate(OpKind.ROLLBACK, None, None, None)

    async def _operate(self, kind: OpKind, uri: str | None, percent: float | None, pin: str | None) -> dict:
        await self._ready(self.settings.watch_timeout_s)
        if self.retired:
            raise RolloutConflictError(f"controller {self.name} is retired: {self.retired}")
        lock, _, _ = self._objects()
        async with lock:
            self.sm.check_can_start()
            self.sm.pending = f"{kind.value} of {uri}" if uri else kind.value
        version, record = None, None
        try:
            if uri is not None:
                if kind == OpKind.CANARY and not 0 < percent <= 100:
                    raise RolloutConflictError(f"--canary must be in (0, 100], got {percent}")
                try:
                    version, record = await self.catalog.resolve(uri, known=self.sm.state.validated,
                                                                 expected_sha256=pin)
                except AdapterValidationError as e:
                    async with lock:
                        rejected = getattr(e, "version", None) or AdapterVersion(uri, "?", "?")
                        await self._persist(self.sm, self.sm.reject(rejected, e.problems, time.time(), kind=kind))
                    raise
            async with lock:
                self.sm.pending = None
                op_id = uuid.uuid4().hex[:8]
                transition = self.sm.request(kind, version, time.time(), percent=percent, op_id=op_id)
                if version is not None:
                    transition.state.validated[version.key] = record
                waiter = self._waiters[op_id] = asyncio.get_running_loop().create_future()
                await self._persist(self.sm, transition)
        finally:
            self.sm.pending = None
        if version is not None:  # stage once now, for every dtype the replicas run, before they ask
            for dtype in set(self._dtypes.values()) or {"float32"}:
                self._tasks.append(asyncio.ensure_future(self._prestage(version, dtype, record)))
        result = await waiter
        if record and record.get("signer"):
            result["signer"] = record["signer"]
        return result

    async def _prestage(self, version: AdapterVersion, dtype: str, record: dict) -> None:
        try:
            await self.catalog.staged_ref(version, dtype, record)
        except Exception as e:  # noqa: BLE001 - the replicas' watch stages (and reports) it again
            logger.error("could not stage %s for %s: %s", version.short(), dtype, describe_error(e))

    async def retire(self, reason: str) -> None:
        """A newer settings generation took over: serve no more operations; replicas keep what they run."""
        self.retired = reason
        logger.warning("controller %s retired: %s", self.name, reason)

    async def whoami(self) -> dict:
        return {"name": self.name, "started": self.started, "retired": self.retired,
                "fenced": self.sm.fenced if self.sm else None}

    # --- status ---------------------------------------------------------------------------------------

    async def status(self) -> dict:
        """Everything ``hotswap status`` shows; available while the controller is still starting."""
        self._objects()
        if self.sm is None or self.waiting_for:
            return {"app": self.app_name, "controller": self.name, "ready": False, "waiting_for": self.waiting_for,
                    "state_store": self.store.describe(), "replicas": [], "history": [], "rollout": None,
                    "stable": None, "canary": None, "canary_replicas": [], "rejected": {}}
        now = time.time()
        sm, s = self.sm, self.sm.state
        replicas = []
        for rid in sm.registry.known():
            report = sm.registry.report(rid)
            assigned = sm.assignment(rid)
            stats = report.stats or {}
            replicas.append({
                "id": rid,
                "adapter_uri": report.running.uri,
                "adapter_sha256": report.running.sha256,
                "adapter_config_sha256": report.running.config_sha256,
                "phase": report.phase.value,
                "failure": report.failure,
                "swaps": stats.get("swaps"),
                "last_swap_ms": stats.get("last_swap_ms"),
                "last_drain_ms": stats.get("last_drain_ms"),
                "last_smoke_ms": stats.get("last_smoke_ms"),
                "compiled_graphs": stats.get("compiled_graphs"),
                "slots": stats.get("slots"),
                "rows_in_flight": stats.get("rows_in_flight"),
                "queued": stats.get("queued"),
                "step_stats": stats.get("step_stats"),  # the scheduler's, since the replica started (--json only)
                "pid": stats.get("pid"),
                "assigned_uri": assigned.uri,
                "assigned_sha256": assigned.sha256,
                "live": sm.registry.is_live(rid, now),
            })
        op = s.operation
        rollout = None
        if op is not None:
            rollout = {**op.to_dict(), "version": op.version.to_dict()}
        return {
            "app": self.app_name,
            "controller": self.name,
            "ready": True,
            "fenced": sm.fenced,
            "retired": self.retired,
            "state_store": self.store.describe(),
            "stable": s.stable.to_dict(),
            "canary": s.canary.to_dict() if s.canary else None,
            "canary_percent": s.canary_percent,
            "canary_replicas": s.canary_replicas,
            "rollout": rollout,
            "replicas": replicas,
            "history": s.history[-50:],
            "rejected": s.rejected,
            "staged": self.catalog.staged_versions(),
            # derived from the persisted validation records, so it survives restarts and stays bounded with them
            "signers": {k: r["signer"] for k, r in s.validated.items() if r.get("signer")},
        }
