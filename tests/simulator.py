"""A deterministic simulator for the rollout state machine: fake replicas, a fake state store that fails on
demand, controller crashes and takeovers, all on a simulated clock. No Ray, no threads, no sleeping.

A :class:`World` is driven one action at a time (the property tests draw the actions with hypothesis;
pinned regression cases list them by hand). After every action it checks the invariants that must hold
at every step; :meth:`World.quiesce` then lets the world run with no more faults and checks what must
hold once everything has settled. A violation raises :class:`Violation` naming the invariant and the
action trace that led to it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hotswap.errors import ControllerUnavailableError, HotswapError, StateConflictError
from hotswap.messages import OpKind, Outcome, Phase, ReplicaPhase, ReplicaReport
from hotswap.rollout import Notify, Reply, RolloutMachine, Transition, canary_count
from hotswap.state import DesiredState, SaveOutcomeUnknown
from hotswap.versions import BASE, AdapterVersion

LIVENESS_S = 8.0
SWAP_TIMEOUT_S = 20.0
TICK_S = 1.0
SETTLE_S = 3.0  # replicas report every tick here: a restarted controller has heard them all by then
HEALTH_S = 4.0  # a FAILED replica fails Serve's health check: replaced this long after it broke
RETRY_S = 5.0  # a replica retries a failed steady-state assignment this long after (the real one: _RETRY_S)
VERSIONS = {f"v{i}": AdapterVersion(f"s3://bkt/v{i}", f"{i:064x}", f"{i + 100:064x}") for i in range(1, 5)}


class Violation(AssertionError):
    pass


class FakeBackend:
    """One persisted state object, fenced by a generation counter, whose saves can be made to fail."""

    def __init__(self) -> None:
        self.raw: str | None = None
        self.generation = 0
        self.failures = 0  # the next N saves fail with OSError
        self.lost = 0  # the next N saves land, but their answers are lost and the check read fails too
        self.saves = 0


class FakeStore:
    """As :class:`hotswap.state.S3StateStore` behaves: a write whose outcome it could not tell is settled (its
    generation adopted if it landed) before the next write."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.seen: int | None = None
        self._unclear: tuple[str, int] | None = None  # (raw, generation) of a write that may have landed

    @property
    def unclear(self) -> bool:
        return self._unclear is not None

    def load(self) -> DesiredState | None:
        self.seen = self.backend.generation
        return DesiredState.from_json(self.backend.raw) if self.backend.raw else None

    def save(self, state: DesiredState) -> None:
        b = self.backend
        if b.failures > 0:
            b.failures -= 1
            raise OSError("injected: state store unavailable")
        if self._unclear is not None:
            if (b.raw, b.generation) == self._unclear:  # it had landed: this store wrote what is there
                self.seen = b.generation
            self._unclear = None
        if self.seen != b.generation:
            raise StateConflictError(f"fake state written by another controller (generation {b.generation})")
        state.generation = b.generation + 1
        if b.lost > 0:  # it lands; nobody hears so
            b.lost -= 1
            b.raw, b.generation = state.to_json(), state.generation
            b.saves += 1
            self._unclear = (b.raw, b.generation)
            raise SaveOutcomeUnknown("injected: the write landed, its answer was lost and the check read failed")
        b.raw, b.generation, self.seen = state.to_json(), state.generation, state.generation
        b.saves += 1


class SimController:
    """The driver of one controller process: persist, then commit or fail, then carry out the actions."""

    def __init__(self, world: World, name: str, *, restarted: bool = False) -> None:
        self.world, self.name, self.restarted = world, name, restarted
        self.ids = (f"{name}-op{i}" for i in itertools.count())
        self.replies: dict[str, Reply] = {}
        self.claimed = False
        self.start()

    def start(self) -> bool:
        """Load the state and claim it (as the actor's start-up does); retried until the claim is saved."""
        if self.claimed:
            return True
        self.store = FakeStore(self.world.backend)
        state = self.store.load() or DesiredState()
        self.sm = RolloutMachine(state, batch_size=self.world.batch_size, swap_timeout_s=SWAP_TIMEOUT_S,
                                 liveness_s=LIVENESS_S, forget_after_s=60.0, settle_s=SETTLE_S,
                                 now=self.world.now, new_id=lambda: next(self.ids), cluster=self.world.cluster,
                                 restarted=self.restarted)
        self.claimed = self.run(self.sm.claim(self.world.now))
        return self.claimed

    def tick(self) -> bool:
        """The controller's tick: the machine's, or, after a save that may have landed unseen, a save of the
        state this controller holds (what :meth:`HotswapController._tick_forever` does)."""
        transition = self.sm.tick(self.world.now)
        if transition is None and self.store.unclear and not self.sm.fenced:
            transition = Transition(self.sm.state.copy())
        return self.run(transition)

    def run(self, transition) -> bool:
        if transition is None:
            return True
        before = self.sm.state.operation  # the operation as last committed (what a reply's check needs)
        try:
            self.store.save(transition.state)
        except (OSError, StateConflictError) as e:
            actions = self.sm.fail(transition, e)
            ok = False
        else:
            actions = self.sm.commit(transition)
            ok = True
            self.world.check_persisted(self)
        for action in actions:
            if isinstance(action, Reply):
                self.replies[action.op_id] = action
                self.world.finished(action, before, self.sm.registry)
            elif not isinstance(action, Notify):  # pragma: no cover - a new action kind needs a handler here
                raise Violation(f"unknown action {action!r}")
        return ok


@dataclass
class SimReplica:
    id: str
    running: AdapterVersion = BASE
    alive: bool = True
    stalled: bool = False
    slowness: int = 0  # extra ticks an apply takes
    applying: tuple[AdapterVersion, str, int] | None = None  # version, token, ticks left
    failed: tuple[AdapterVersion, str] | None = None
    failed_at: float = 0.0
    swaps: list[tuple[str, AdapterVersion]] = field(default_factory=list)
    # while it swaps, the report names the version it swaps to (one slot, loaded in place) or, with two slots, the
    # one still active until the new one passed its check and is flipped to (the real engine's default)
    names_new_while_swapping: bool = True
    # its next report arrives this many ticks late, after the ones it sends meanwhile (Ray does not order an async
    # actor's calls, not even one caller's: a heartbeat sent while swapping can land after the ack that followed it)
    delay_next: int = 0
    sent: int = 0
    # the answer to its watch (an assignment) reaches it this many ticks after the controller handed it out; the
    # replica sends nothing meanwhile (its one watch call is still returning), then applies it however stale
    hold_next: int = 0
    inbox: tuple[AdapterVersion, str, int] | None = None  # version, token, ticks until it arrives
    # one slot: a failed copy whose restore failed too; it reports FAILED (out of rotation) on its previous version
    # until an apply succeeds, and Serve replaces it when its health check has failed for a while
    broken_since: float | None = None

    def report(self) -> ReplicaReport:
        self.sent += 1
        running = self.applying[0] if self.applying and self.names_new_while_swapping else self.running
        phase = (ReplicaPhase.SWAPPING if self.applying else
                 ReplicaPhase.FAILED if self.broken_since is not None else ReplicaPhase.IDLE)
        return ReplicaReport(self.id, running, phase,
                             failed=self.failed[0] if self.failed else None,
                             failure="injected smoke-check failure" if self.failed else None,
                             failed_token=self.failed[1] if self.failed else "", seq=(0, self.sent))


class World:
    def __init__(self, *, replicas: int = 3, batch_size: int = 1, initial: str | None = "v1",
                 two_slots: bool = False) -> None:
        self.now = 0.0
        self.two_slots = two_slots  # replicas name the active slot's version while they swap
        self.in_flight: list[tuple[int, ReplicaReport]] = []  # late reports: (the step they arrive at, report)
        self.cluster = "sim-cluster"  # the Ray cluster's session name; new_cluster() starts another
        self.batch_size = batch_size
        self.backend = FakeBackend()
        self.bad: set[AdapterVersion] = set()  # smoke checks fail on these
        self.unrestorable: set[AdapterVersion] = set()  # a failed check of one of these breaks a one-slot restore
        self.deadly: set[AdapterVersion] = set()  # applying one kills the replica (Serve starts a replacement)
        self.replacements = 0
        self.unfetchable: set[str] = set()
        self.trace: list[str] = []
        self.steps = 0
        self.completed: list[Reply] = []
        self.asked: list[tuple[SimController, str]] = []  # user operations: the controller asked, the id
        self._ids = itertools.count()
        self.replicas: dict[str, SimReplica] = {}
        self.zombie: SimController | None = None
        self.controller = SimController(self, "c0")
        if initial:
            self.controller.run(self.controller.sm.initialize(VERSIONS[initial], VERSIONS[initial].uri, self.now))
        for _ in range(replicas):
            self.add_replica()

    # --- actions --------------------------------------------------------------------------------------

    def add_replica(self) -> str:
        rid = f"r{next(self._ids)}"
        self.replicas[rid] = replica = SimReplica(rid, names_new_while_swapping=not self.two_slots)
        self.trace.append(f"register {rid}")
        if not self.controller.start():
            return rid  # it registers at its next step
        # a replica registers before it serves, and starts on what the answer assigns
        self._send(replica)
        self._apply_now(replica, self.controller.sm)
        if replica.alive:
            self._send(replica)
        return rid

    def request(self, kind: OpKind, uri: str | None = None, percent: float | None = None) -> str | None:
        self.trace.append(f"{kind.value} {uri or ''} {percent or ''}".strip())
        if not self.controller.start():
            return None  # still starting: the actor answers ControllerUnavailableError
        sm = self.controller.sm
        try:
            sm.check_can_start()
            if uri in self.unfetchable:
                raise HotswapError(f"injected: fetch of {uri} failed")
            version = VERSIONS[uri] if uri else None
            op_id = f"user{len(self.trace)}"
            transition = sm.request(kind, version, self.now, percent=percent, op_id=op_id)
        except HotswapError:
            return None
        self.asked.append((self.controller, op_id))
        self.controller.run(transition)
        return op_id

    def kill(self, rid: str) -> None:
        self.trace.append(f"kill {rid}")
        self.replicas[rid].alive = False

    def stall(self, rid: str, on: bool) -> None:
        self.trace.append(f"{'stall' if on else 'resume'} {rid}")
        self.replicas[rid].stalled = on

    def delay(self, rid: str, ticks: int) -> None:
        """``rid``'s next report arrives ``ticks`` ticks late, overtaken by the ones it sends meanwhile."""
        self.trace.append(f"delay {rid}'s next report {ticks} ticks")
        self.replicas[rid].delay_next = ticks

    def hold(self, rid: str, ticks: int) -> None:
        """The next assignment handed to ``rid`` reaches it ``ticks`` ticks later (it may be stale by then)."""
        self.trace.append(f"hold {rid}'s next assignment {ticks} ticks")
        self.replicas[rid].hold_next = ticks

    def _hand(self, replica: SimReplica, sm: RolloutMachine) -> tuple[AdapterVersion, str]:
        """The controller answers the replica's watch (or register), which carried its last report: as the actor
        does, it records what it handed out and the number of that report."""
        version, token = sm.assignment(replica.id), sm.token(replica.id)
        sm.registry.hand(replica.id, version, (0, replica.sent))
        return version, token

    def _send(self, replica: SimReplica) -> None:
        report = replica.report()
        if replica.delay_next:
            self.in_flight.append((self.steps + replica.delay_next, report))
            replica.delay_next = 0
        else:
            self.controller.run(self.controller.sm.heard(report, self.now))

    def _deliver_late(self) -> None:
        due = [report for step, report in self.in_flight if step <= self.steps]
        self.in_flight = [(step, report) for step, report in self.in_flight if step > self.steps]
        for report in due:
            self.trace.append(f"late report from {report.replica_id}: {report.running.short()} {report.phase.value}")
            self.controller.run(self.controller.sm.heard(report, self.now))

    def crash_controller(self) -> None:
        self.trace.append("crash controller")
        self.controller = SimController(self, f"c{self.steps}", restarted=True)  # Ray restarts it in its cluster

    def new_cluster(self) -> None:
        """The whole Ray cluster is replaced (a new `serve run`, a new RayCluster): its replicas end with it, a
        controller in the new cluster starts on the persisted state, and as many new replicas register with it."""
        self.trace.append("new cluster")
        count = sum(r.alive for r in self.replicas.values())
        for replica in self.replicas.values():
            replica.alive = False
        self.cluster = f"sim-cluster-{self.steps}"
        self.zombie = self.controller  # an old cluster may outlive the switch (a KubeRay upgrade): fenced, not gone
        self.controller = SimController(self, f"n{self.steps}")
        for _ in range(count):
            self.add_replica()

    def takeover(self) -> None:
        """A second controller starts on the same state (a redeploy, a zombie); the old one stays around."""
        self.trace.append("takeover")
        self.zombie = self.controller
        self.controller = SimController(self, f"t{self.steps}")

    def fail_saves(self, n: int) -> None:
        self.trace.append(f"fail next {n} saves")
        self.backend.failures = n

    def lose_answers(self, n: int) -> None:
        self.trace.append(f"the next {n} saves land unseen")
        self.backend.lost = n

    def advance(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.trace.append("tick")
            self.now += TICK_S
            self.steps += 1
            # the ones that died since the last tick; bounded, so a crash loop cannot run away (Serve still owes the
            # rest: quiesce starts them once nothing kills them)
            due = self.replacements if len(self.replicas) < 60 else 0
            self.replacements -= due
            for _ in range(due):
                self.add_replica()
            for replica in list(self.replicas.values()):  # Serve replaces a replica failing its health check
                if replica.alive and replica.broken_since is not None and self.now - replica.broken_since >= HEALTH_S:
                    self.trace.append(f"{replica.id} replaced (health check failed)")
                    replica.alive = False
                    self.replacements += 1
            if self.controller.start():  # a controller still starting answers no replica (they retry)
                for replica in list(self.replicas.values()):
                    if replica.alive and not replica.stalled:
                        self._replica_step(replica)
                self._deliver_late()
                self.controller.tick()
            if self.zombie is not None:  # a zombie still hears old heartbeats and ticks; its saves must be refused
                self.zombie.tick()
            self.check_step()

    # --- replica behaviour ----------------------------------------------------------------------------

    def _replica_step(self, replica: SimReplica) -> None:
        sm = self.controller.sm
        if replica.inbox is not None:
            version, token, left = replica.inbox
            if left > 0:
                replica.inbox = (version, token, left - 1)
                return  # its watch's answer is still on its way: nothing to report meanwhile
            replica.inbox = None
            if version != replica.running:  # the real replica applies what it is handed, however stale
                self._start_apply(replica, version, token)
                if not replica.alive:
                    return
        elif replica.applying is not None:
            version, token, left = replica.applying
            if left > 0:
                replica.applying = (version, token, left - 1)
            else:
                self._finish_apply(replica, version, token)
        else:
            target, token = sm.assignment(replica.id), sm.token(replica.id)
            # a failure is not retried for the same operation; a failed steady-state assignment is, after a while
            retry = replica.failed != (target, token) or (not token and self.now - replica.failed_at >= RETRY_S)
            if target != replica.running and retry:
                self._hand(replica, sm)
                if replica.hold_next:
                    replica.inbox, replica.hold_next = (target, token, replica.hold_next - 1), 0
                    return
                self._start_apply(replica, target, token)
                if not replica.alive:
                    return
        self._send(replica)

    def _start_apply(self, replica: SimReplica, target: AdapterVersion, token: str) -> None:
        # it says it is swapping first (the real replica heartbeats as an apply starts), then swaps
        replica.applying = (target, token, replica.slowness)
        self._send(replica)
        if not replica.slowness:
            self._finish_apply(replica, target, token)

    def _apply_now(self, replica: SimReplica, sm: RolloutMachine) -> None:
        target, token = self._hand(replica, sm)
        if target != replica.running:
            replica.applying = (target, token, 0)
            self._send(replica)  # the heartbeat as its apply starts
            self._finish_apply(replica, target, token)

    def _finish_apply(self, replica: SimReplica, version: AdapterVersion, token: str) -> None:
        replica.applying = None
        if version in self.deadly:
            self.trace.append(f"{replica.id} died applying {version.uri}")
            replica.alive = False
            self.replacements += 1  # Serve starts a replacement, at the next tick
            return
        if version in self.bad:
            replica.failed, replica.failed_at = (version, token), self.now
            if version in self.unrestorable and not self.two_slots and replica.broken_since is None:
                replica.broken_since = self.now  # two slots: the active one was never touched, nothing to restore
                self.trace.append(f"{replica.id} could not restore {replica.running.short()} after {version.uri}")
            return
        replica.running, replica.failed, replica.broken_since = version, None, None
        replica.swaps.append((token, version))
        if token.endswith(":forward") and replica.swaps.count((token, version)) > 1:
            self.violation(f"{replica.id} swapped to {version.short()} twice for operation {token}")

    # --- invariants -----------------------------------------------------------------------------------

    def violation(self, what: str) -> None:
        raise Violation(f"{what}\ntrace: {' | '.join(self.trace[-60:])}")

    def check_persisted(self, controller: SimController) -> None:
        persisted = DesiredState.from_json(self.backend.raw)
        mem = controller.sm.state
        if persisted.to_json() != mem.to_json():
            self.violation("memory differs from the persisted state after a commit")
        if controller is self.zombie and self.controller.claimed:
            self.violation("a fenced (zombie) controller's save went through")

    def finished(self, reply: Reply, op=None, registry=None) -> None:
        earlier = [r for r in self.completed if r.op_id == reply.op_id]
        # once, except after an answer that said the outcome was not known (a save that may have landed unseen: the
        # controller that resumes it from the stored state answers it again, to nobody)
        if earlier and not all(isinstance(r.error, ControllerUnavailableError) for r in earlier):
            self.violation(f"operation {reply.op_id} answered twice")
        self.completed.append(reply)
        if reply.outcome == Outcome.REVERTED and op is not None and op.id == reply.op_id and not (
                op.phase == Phase.REVERT and self.now > op.deadline):  # not the revert's own deadline passing
            # "reverted" means back: when the reply goes out, every replica the operation touched runs its previous
            # version, and no target runs the version, swaps to it or has it on its way. Skipped: a target dropped
            # that the controller has not heard from since (gone, as far as it can know), dead replicas, and broken
            # ones (FAILED: their engine serves nothing until Serve replaces them)
            touched = op.touched()
            for rid in op.targets:
                previous = op.previous[rid]
                replica = self.replicas.get(rid)
                if replica is None or not replica.alive or replica.broken_since is not None:
                    continue  # dead, or broken (its engine stopped serving: FAILED, out of rotation)
                if rid in reply.result["dropped"] and registry is not None and not registry.is_live(rid, self.now):
                    continue
                coming = [v[0] for v in (replica.applying, replica.inbox) if v]
                if rid in touched:
                    wrong = replica.running != previous or any(v != previous for v in coming)
                else:
                    wrong = replica.running == op.version or op.version in coming
                if wrong:
                    self.violation(f"{op.kind.value} answered 'reverted' while {rid} runs {replica.running.short()}"
                                   f"{' and swaps to ' + coming[0].short() if coming else ''}"
                                   f", not its previous {previous.short()}")
        version = AdapterVersion.of(reply.result.get("version")) if reply.result else None
        if (reply.outcome == Outcome.OK and version in self.deadly and reply.result["dropped"]
                and not reply.result["swapped"] and reply.result["kind"] in ("roll", "canary", "promote")):
            self.violation(f"{version.short()} kills every replica that applies it, yet its "
                           f"{reply.result['kind']} succeeded")

    def check_step(self) -> None:
        s = self.controller.sm.state
        op = s.operation
        if op is not None and set(op.done) - set(op.targets):
            self.violation("an operation counts replicas done that it never targeted")
        if op is not None and op.kind == OpKind.CANARY and op.percent is None:
            self.violation("a canary operation without a share")
        if s.canary is not None and s.canary_percent is None:
            self.violation("an active canary without a share")
        if self.zombie is not None and self.zombie.sm.state.generation > self.backend.generation:
            self.violation("the zombie's memory ran ahead of the persisted state")

    def live(self) -> list[SimReplica]:
        return [r for r in self.replicas.values() if r.alive and not r.stalled]

    def quiesce(self, *, max_ticks: int | None = None) -> None:
        """Stop every fault, let the world settle, and check the invariants of a settled world."""
        self.trace.append("quiesce")
        self.backend.failures = 0
        self.backend.lost = 0
        for r in self.replicas.values():
            r.stalled = False
            r.slowness = 0
            r.delay_next = 0  # reports already in flight still arrive late
            r.hold_next = 0  # an assignment already on its way still arrives late
        self.bad.clear()
        self.unrestorable.clear()
        self.deadly.clear()
        owed, self.replacements = self.replacements, 0  # replicas a capped crash loop did not restart
        for _ in range(owed):
            self.add_replica()
        bound = max_ticks or int((len(self.replicas) + 4) * (SWAP_TIMEOUT_S + LIVENESS_S) * 2 + 60)
        for _ in range(bound):
            self.advance()
            if self._settled():
                break
        else:
            s = self.controller.sm.state
            self.violation(f"not settled after {bound} ticks: operation {s.operation and s.operation.to_dict()}; "
                           f"running {[(r.id, r.running.uri) for r in self.live()]}")
        self.check_settled()

    def _settled(self) -> bool:
        sm = self.controller.sm
        if not self.controller.claimed or sm.fenced or sm.state.operation is not None:
            return False
        if not sm.registry.settled(self.now):
            return False
        if sm.registry.live(self.now) != sorted(r.id for r in self.live()):
            return False  # the controller has not yet noticed a replica that died
        if any(not sm.converged(r.id) for r in self.live()):
            return False
        return self.controller.tick() and sm.state.operation is None and not self.controller.store.unclear

    def check_settled(self) -> None:
        sm = self.controller.sm
        s = sm.state
        answered = {r.op_id for r in self.completed}
        for controller, op_id in self.asked:
            # its caller waits on the controller it asked: that one, unless it crashed or was fenced, must answer
            # (a crash answers the caller with the actor's death; a fenced one answers every waiter at once)
            if controller is self.controller and not controller.sm.fenced and op_id not in answered:
                self.violation(f"operation {op_id} was never answered, though its controller is still serving")
        if DesiredState.from_json(self.backend.raw).to_json() != s.to_json():
            # e.g. a save that landed unseen (its caller told it failed) and was never overwritten: a restart would
            # resume what nobody committed
            self.violation("settled, yet the persisted state differs from the controller's")
        for r in self.live():
            want = sm.assignment(r.id)
            if r.running != want:
                self.violation(f"{r.id} runs {r.running.short()}, its derived assignment is {want.short()}")
            if r.running not in (s.stable, s.canary):
                self.violation(f"{r.id} runs {r.running.short()}, neither stable nor canary")
        if s.canary is not None:
            on_canary = [r for r in self.live() if r.running == s.canary]
            want = canary_count(s.canary_percent, len(self.live()))
            blocked = s.rebalance_blocked == s.canary.key  # a failed rebalance is not retried: short, never over
            if len(on_canary) != want and not (blocked and len(on_canary) < want):
                self.violation(f"canary share {len(on_canary)}/{len(self.live())} replicas, asked "
                               f"{s.canary_percent}% = {want}")
        for reply in self.completed:
            if reply.outcome == Outcome.REVERTED and reply.result["version"] not in (
                    s.stable.to_dict(), s.canary.to_dict() if s.canary else None):
                gone_to = AdapterVersion.of(reply.result["version"])
                if any(r.running == gone_to for r in self.live()):
                    self.violation(f"a replica runs {gone_to.short()} after its operation was reverted")
        last = s.history[-1] if s.history else None
        if last and last["kind"] == "rollback" and last["result"] == "ok":
            if s.canary is None and any(r.running != s.stable for r in self.live()):
                self.violation("a replica runs another version than stable after a completed rollback")


__all__ = ["VERSIONS", "FakeBackend", "Phase", "SimController", "Violation", "World"]
