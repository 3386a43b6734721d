"""The rollout state machine: events in, actions out; no Ray, no I/O, no clock of its own.

Level-triggered, as Kubernetes controllers are. The :class:`~hotswap.state.DesiredState`
(stable, canary and its share, the operation in progress) is the only thing decided; every
replica's assignment is *derived* from it by :meth:`RolloutMachine.assignment`, so a replica
that is late, new, restarted or back from a stall converges by the same rule as any other.

Every change is proposed as a :class:`Transition` holding the candidate state. The driver
(the controller actor, or the simulator in the tests) persists the candidate and then calls
:meth:`RolloutMachine.commit`, which makes it the state and returns the actions to carry out
(replies, wake-ups), or :meth:`RolloutMachine.fail` when the save failed, which keeps the
state exactly as last persisted. A transition that is not committed has no effect; the
conditions that proposed it are looked at again on the next event or tick, so a transient
save failure delays progress but never loses it.

An operation moves its ``targets`` to its version ``batch_size`` at a time. A replica counts
as moved only when it reports running the version. A replica that reports a failure (for the
operation's own assignment token), or a step that gets no answer within ``swap_timeout_s``,
turns the operation to its REVERT phase: every target is assigned its previous version again,
and the operation ends when each is back (idle on it, with no other version handed to it
since its last report), gone, out of rotation, or the revert's own deadline passes.
Operations that move everyone (roll, promote, rollback to the previous stable) take in
replicas that appear while they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.errors import (
    ControllerUnavailableError,
    HotswapError,
    RolloutConflictError,
    RolloutError,
    StateConflictError,
)
from hotswap.messages import OpKind, Outcome, Phase, ReplicaPhase, ReplicaReport
from hotswap.registry import ReplicaRegistry
from hotswap.state import DesiredState, Operation, SaveOutcomeUnknown
from hotswap.versions import AdapterVersion

__all__ = ["Notify", "Reply", "RolloutMachine", "Transition", "canary_count"]

_PREVIOUS_STABLE_KEPT = 20
_DEATHS_TO_REVERT = 2  # replicas gone mid-swap in one operation: one can be chance (a kill), two is the version


def canary_count(percent: float, replicas: int) -> int:
    """Replicas a canary of ``percent`` moves: the most whose share does not exceed ``percent``, at least one.

    34% of 3 replicas is one replica (33%), never two (67%): a canary never gets more
    traffic than asked for, except the minimum of one replica.
    """
    return min(replicas, max(1, math.floor(percent * replicas / 100 + 1e-9)))


@dataclass(frozen=True)
class Reply:
    """Answer the caller waiting on operation ``op_id``: ``result`` when it succeeded, else ``error``."""

    op_id: str
    outcome: Outcome
    result: dict
    error: HotswapError | None = None


@dataclass(frozen=True)
class Notify:
    """Assignments may have changed: wake the replicas' long-polls."""


@dataclass
class Transition:
    """A proposed state (persist it first) and what to do once it is, or is not, persisted."""

    state: DesiredState
    on_commit: list = field(default_factory=list)
    on_fail: list = field(default_factory=list)


class RolloutMachine:
    """The controller's logic. Feed it events; persist what it proposes; carry out what it returns."""

    def __init__(
        self,
        state: DesiredState,
        *,
        batch_size: int,
        swap_timeout_s: float,
        liveness_s: float,
        forget_after_s: float,
        settle_s: float,
        now: float,
        new_id: Callable[[], str],
        cluster: str | None = None,
        restarted: bool = False,
    ) -> None:
        self.state = state
        self.batch_size = batch_size
        self.swap_timeout_s = swap_timeout_s
        self.cluster = cluster
        # A replica registers before it serves, and a cluster's replicas end with it, so replicas serving from this
        # state without having reported to this controller yet can only be in the cluster that last claimed it, or
        # in this one if a controller of this state ran here before (``restarted``: Ray restarted this one, or the
        # controller found its own mark of an earlier claim in this cluster's GCS, e.g. one killed and created
        # anew; another cluster may have claimed the state meanwhile, e.g. an upgrade that was held back). A state
        # never saved (generation 0), or last claimed in another Ray cluster and never here (a new `serve run`, a
        # new RayCluster), leaves nobody unheard to wait ``settle_s`` for: an operation moving
        # everyone would otherwise end only then. A state saved without a cluster name (older releases) is waited
        # for, as before.
        unheard = state.generation > 0 and (restarted or state.cluster in (None, cluster))
        self.registry = ReplicaRegistry(liveness_s=liveness_s, forget_after_s=forget_after_s,
                                        settle_s=settle_s if unheard else 0.0, started=now)
        self.new_id = new_id
        self.fenced: str | None = None  # why this controller serves no operation any more
        self.pending: str | None = None  # an operation being fetched and validated (not persisted)
        self._last_tick: float | None = None

    # --- derived assignments --------------------------------------------------------------------------

    def assignment(self, replica_id: str, state: DesiredState | None = None) -> AdapterVersion:
        """The version ``replica_id`` must run, derived from ``state`` (default: the committed state)."""
        s = state if state is not None else self.state
        op = s.operation
        if op is not None and replica_id in op.targets and replica_id not in op.dropped:
            if op.phase == Phase.FORWARD and (replica_id in op.moving or replica_id in op.done):
                return op.version
            return op.previous[replica_id]
        return _base_rule(s, replica_id)

    def token(self, replica_id: str) -> str:
        """Names the assignment a replica is given, so that its failure report is matched to it, not to an older one."""
        op = self.state.operation
        if op is not None and replica_id in op.targets:
            return f"{op.id}:{op.phase.value}"
        return ""

    def converged(self, replica_id: str) -> bool:
        report = self.registry.report(replica_id)
        return (report is not None and report.phase == ReplicaPhase.IDLE
                and report.running == self.assignment(replica_id))

    # --- events -----------------------------------------------------------------------------------------

    def resume(self, now: float) -> Transition | None:
        """After a restart: give the step of an operation in progress a fresh deadline (its replicas are
        reporting in again)."""
        op = self.state.operation
        if op is None:
            return None
        cand = self.state.copy()
        cand.operation.deadline = now + self.swap_timeout_s
        _event(cand.operation, f"controller restarted; resuming {op.kind.value} ({op.phase.value}), "
                               f"{len(op.done)}/{len(op.targets)} done")
        return Transition(cand, on_commit=[Notify()])

    def claim(self, now: float) -> Transition:
        """At start-up: the save that claims the state for this controller (fencing any other that still writes it)
        and this cluster, resuming an operation in progress."""
        transition = self.resume(now) or Transition(self.state.copy())
        transition.state.cluster = self.cluster
        return transition

    def initialize(self, version: AdapterVersion, uri: str, now: float) -> Transition | None:
        """The initial adapter is fetched and validated: it becomes stable (once, on a fresh state)."""
        if not self.needs_initial(uri):
            return None
        cand = self.state.copy()
        cand.stable, cand.initial_adapter = version, uri
        _record(cand, "initial", version, Outcome.OK, [], now, 0.0)
        return Transition(cand, on_commit=[Notify()])

    def needs_initial(self, uri: str | None) -> bool:
        s = self.state
        return bool(uri) and s.stable.is_base and not s.history and s.initial_adapter is None

    def check_can_start(self) -> None:
        """Raise :class:`RolloutConflictError` (or the fencing error) if a user operation cannot start now."""
        if self.fenced:
            raise StateConflictError(self.fenced)
        op = self.state.operation
        if self.pending is not None:
            raise RolloutConflictError(f"a rollout is in progress: {self.pending} (fetching and validating); "
                                       "wait for it to finish")
        if op is not None and op.kind != OpKind.REBALANCE:
            raise RolloutConflictError(
                f"a rollout is in progress: {op.kind.value} of {op.version.short()} ({len(op.done)}/"
                f"{len(op.targets)} replicas done, {op.phase.value}); wait for it to finish"
            )

    def request(self, kind: OpKind, version: AdapterVersion | None, now: float, *,
                percent: float | None = None, op_id: str | None = None) -> Transition:
        """A user asks for an operation (``version``: for roll and canary, already fetched and validated).

        Raises :class:`RolloutConflictError` when it cannot start; an upkeep rebalance in progress is
        preempted (it ends where it is: the replicas it moved keep their new role).
        """
        self.check_can_start()
        s = self.state
        live = self.registry.serving(now)
        if kind == OpKind.CANARY:
            if percent is None or not 0 < percent <= 100:
                raise RolloutConflictError(f"--canary must be in (0, 100], got {percent}")
            if s.canary is not None:
                raise RolloutConflictError(f"canary {s.canary.short()} is active; promote or rollback it first")
            if version == s.stable:
                raise RolloutConflictError(f"{version.short()} is already the stable version; a canary of it "
                                           "would compare it with itself")
        if kind == OpKind.PROMOTE and s.canary is None:
            raise RolloutConflictError("no canary is active; start one with 'hotswap roll URI --canary PERCENT'")
        if kind == OpKind.ROLLBACK and s.canary is None and not s.previous_stable:
            raise RolloutConflictError(f"nothing to roll back to: {s.stable.short()} is the first stable version")
        everyone = kind in (OpKind.ROLL, OpKind.PROMOTE) or (kind == OpKind.ROLLBACK and s.canary is None)
        if not live and not (kind == OpKind.ROLLBACK and s.canary is not None):
            if not (everyone and not self.registry.settled(now)):
                raise RolloutConflictError("no live replicas are registered; is the service running?")
            # just (re)started: replicas report in within a watch timeout and join the operation as they do


        cand = s.copy()
        on_commit: list = []
        if cand.operation is not None:  # an upkeep rebalance: preempted
            on_commit += self._finish(cand, Outcome.PREEMPTED, now, reason=f"preempted by a {kind.value}")
        op_id = op_id or self.new_id()
        if kind == OpKind.ROLL:
            op = self._operation(cand, op_id, kind, version, live, now, everyone=True)
        elif kind == OpKind.CANARY:
            op = self._operation(cand, op_id, kind, version, live[: canary_count(percent, len(live))], now,
                                 everyone=False)
            op.percent = percent
        elif kind == OpKind.PROMOTE:
            op = self._operation(cand, op_id, kind, cand.canary, live, now, everyone=True)
        elif cand.canary is not None:  # rollback of the canary: its replicas return to stable
            op = self._operation(cand, op_id, kind, cand.stable, list(cand.canary_replicas), now, everyone=False)
        else:
            op = self._operation(cand, op_id, kind, cand.previous_stable[-1], live, now, everyone=True)
        cand.operation = op
        _event(op, f"{kind.value} of {op.version.short()} to {len(op.targets)} replica(s) started")
        on_commit += self._advance(cand, now) + [Notify()]
        fail = [Reply(op_id, Outcome.ABORTED, {}, None)]  # the driver attaches the save error
        return Transition(cand, on_commit=on_commit, on_fail=fail)

    def reject(self, version: AdapterVersion, problems: list[str], now: float, *, kind: OpKind) -> Transition:
        """Record that ``version`` was refused before anything moved (validation, pin, signature)."""
        cand = self.state.copy()
        _reject(cand, version, problems, now)
        _record(cand, kind.value, version, Outcome.REJECTED, [], now, 0.0, reason="; ".join(problems))
        return Transition(cand)

    def heard(self, report: ReplicaReport, now: float) -> Transition | None:
        """A replica registered, heartbeated or acked."""
        new = self.registry.heard(report, now)
        cand = self.state.copy()
        op = cand.operation
        r = report.replica_id
        if (op is not None and op.everyone and op.phase == Phase.FORWARD and r not in op.targets
                and _base_rule(cand, r) != op.version):
            op.targets.append(r)  # joins the operation, straight onto its version
            op.previous[r] = _base_rule(cand, r)
            op.moving.append(r)
            op.deadline = max(op.deadline, now + self.swap_timeout_s)  # a joiner gets its own full swap timeout
            _event(op, f"{r}: {'registered' if new else 'reported in'} during the {op.kind.value}; assigned "
                       f"{op.version.short()}")
        actions = self._advance(cand, now)
        return self._changed(cand, actions)

    def tick(self, now: float) -> Transition | None:
        """Time passed: deadlines, replicas gone quiet, the canary's share.

        A tick that comes long after the previous one means this controller stalled (a slow save held it):
        replicas could not report meanwhile, so they get a fresh grace period instead of being judged gone.
        """
        if self._last_tick is not None and now - self._last_tick > self.registry.liveness_s / 2:
            self.registry.grace(now)
        self._last_tick = now
        self.registry.prune(now)
        cand = self.state.copy()
        actions = self._advance(cand, now)
        return self._changed(cand, actions)

    def commit(self, transition: Transition) -> list:
        self.state = transition.state
        return transition.on_commit

    def fail(self, transition: Transition, error: BaseException) -> list:
        """The save of ``transition`` failed: the state stays as last persisted."""
        if isinstance(error, StateConflictError):
            self.fenced = str(error)
        out = []
        for action in transition.on_fail:
            if isinstance(action, Reply):
                action = Reply(action.op_id, action.outcome, action.result, _save_error(error))
            out.append(action)
        return out

    # --- the operation ----------------------------------------------------------------------------------

    def _operation(self, cand: DesiredState, op_id: str, kind: OpKind, version: AdapterVersion,
                   targets: list[str], now: float, *, everyone: bool) -> Operation:
        targets = [r for r in targets if self.assignment(r, cand) != version]  # already assigned it: nothing to do
        previous = {r: self.assignment(r, cand) for r in targets}
        return Operation(id=op_id, kind=kind, version=version, targets=targets, previous=previous,
                         everyone=everyone, started=now, deadline=now + self.swap_timeout_s)

    def _advance(self, cand: DesiredState, now: float) -> list:
        op = cand.operation
        if op is None:
            return self._upkeep(cand, now)
        reg = self.registry
        token = f"{op.id}:{op.phase.value}"
        # back after all (a stall, not a death): forward, it takes its turn again, unless it runs the version already
        # or is still swapping to it (then it is counted, or waited for, as the replicas moving now are: sent the
        # old version while it waited for its turn, it would swap back and then forward again); in a revert, it is
        # sent back too (its assignment is its previous version)
        for r in list(op.dropped):
            report = reg.report(r)
            if reg.is_live(r, now) and report is not None and report.phase != ReplicaPhase.FAILED:
                op.dropped.remove(r)
                if r in op.died:  # a stall, not a death: it no longer counts towards _DEATHS_TO_REVERT
                    op.died.remove(r)
                    op.deaths -= 1
                    _event(op, f"{r}: a stall, not a death (deaths now {op.deaths})")
                if op.phase == Phase.FORWARD and report.phase == ReplicaPhase.IDLE and report.running == op.version:
                    op.done.append(r)
                    _event(op, f"{r}: reported in again, running {op.version.short()}: counted as moved")
                elif (op.phase == Phase.FORWARD and report.phase == ReplicaPhase.SWAPPING
                      and _handed(reg, r) in (op.version, None)):
                    # None: this controller has not answered it yet (it restarted since; a replica that swaps does
                    # not watch): taken to be swapping to the version; if it was not, its turn merely came early.
                    # ``moving`` may then hold one more than ``batch_size``: it was swapping already
                    op.moving.append(r)
                    _event(op, f"{r}: reported in again, still swapping to {op.version.short()}: waited for")
                else:
                    where = op.kind.value if op.phase == Phase.FORWARD else "revert"
                    _event(op, f"{r}: reported in again; back in the {where}")
        if op.phase == Phase.FORWARD:
            for r in list(op.moving):
                report = reg.report(r)
                # failure first: a replica whose smoke check (or restore) failed may already name the version
                if report is not None and report.failed == op.version and _token(report) == token:
                    return self._revert(cand, now, f"replica {r}: {report.failure}")
                if report is not None and report.running == op.version and report.phase == ReplicaPhase.IDLE:
                    op.moving.remove(r)
                    op.done.append(r)
                    _event(op, f"{r}: {op.version.short()} (swap {_ms(report, 'last_swap_ms')} ms)")
                elif reg.is_gone(r, now):
                    op.moving.remove(r)
                    op.dropped.append(r)
                    if report is not None and report.phase == ReplicaPhase.SWAPPING:
                        op.deaths += 1  # it went away while applying the version
                        op.died.append(r)
                    _event(op, f"{r}: gone (no report for liveness_s; stopped or stalled); not counted as moved"
                               + (f" (death {op.deaths} while swapping)" if r in op.died else ""))
                    if op.deaths >= _DEATHS_TO_REVERT:
                        return self._revert(cand, now, f"{op.deaths} replicas went away while swapping to "
                                                       f"{op.version.short()} (last: {r}); the version may kill them")
            if reg.settled(now):
                for r in op.targets:
                    if r not in op.moving and r not in op.done and r not in op.dropped and reg.is_gone(r, now):
                        op.dropped.append(r)
                        _event(op, f"{r}: gone before its turn")
            if op.moving:
                if now > op.deadline:
                    late = ", ".join(op.moving)
                    return self._revert(cand, now, f"replica(s) {late}: no answer within swap_timeout_s="
                                                   f"{self.swap_timeout_s:g}")
                return []
            queue = [r for r in op.targets if r not in op.done and r not in op.dropped]
            if not queue:
                if op.everyone and not reg.settled(now):
                    return []  # after a restart: replicas that have not reported yet still join it
                if op.targets and not op.done:
                    # every replica it moved went away before reporting the version (a version that kills its
                    # replicas looks like this): never make it stable
                    return self._revert(cand, now, f"every targeted replica ({', '.join(op.dropped)}) went away "
                                                   f"before it reported running {op.version.short()}")
                return self._finish(cand, Outcome.OK, now)
            op.moving.extend(queue[: self.batch_size])
            op.deadline = now + self.swap_timeout_s
            return [Notify()]
        # REVERT: every replica the operation touched goes back to its previous version. The others it targeted are
        # looked at too: one dropped mid-swap that came back is no longer counted as moving, yet may run the version
        settled = True
        touched = op.touched()
        for r in _revert_scope(op):
            if r in op.reverted or r in op.dropped:
                continue
            report = reg.report(r)
            pending = reg.in_flight(r)
            if pending is not None and pending != op.previous[r]:
                # handed another version and not heard from since it got it: its reports say nothing of it yet
                if reg.is_gone(r, now):
                    op.dropped.append(r)
                else:
                    settled = False
            elif r not in touched:
                # never moved by this operation: it holds the revert only while it may run the version (it came back
                # on it after it was dropped, is swapping, or is not heard yet after a restart), not for what else it
                # may be doing
                if reg.is_gone(r, now):
                    op.dropped.append(r)
                elif report is None or report.phase == ReplicaPhase.SWAPPING or (
                        report.running == op.version and report.phase == ReplicaPhase.IDLE):
                    settled = False
            elif _back(report, op.previous[r]):
                op.reverted.append(r)
            elif reg.is_gone(r, now):
                op.dropped.append(r)
            # out of rotation after a failure of this operation's (forward or revert): one that failed forward and
            # names its previous version is never handed the revert (nothing differs), so no revert token comes
            elif (report is not None and report.phase == ReplicaPhase.FAILED
                  and _token(report).startswith(f"{op.id}:")):
                op.reverted.append(r)
                if _token(report) == f"{op.id}:{Phase.FORWARD.value}":
                    _event(op, f"{r}: failed {op.version.short()} and could not restore {op.previous[r].short()} "
                               f"({report.failure}); it is out of rotation until it converges")
                else:
                    _event(op, f"{r}: could not go back to {op.previous[r].short()} ({report.failure}); it is out "
                               "of rotation until it converges")
            else:
                settled = False
        if settled or now > op.deadline:
            return self._finish(cand, Outcome.REVERTED, now, reason=op.reason)
        return []

    def _revert(self, cand: DesiredState, now: float, reason: str) -> list:
        op = cand.operation
        op.phase, op.reason, op.deadline = Phase.REVERT, reason, now + self.swap_timeout_s
        _event(op, f"reverting {len(op.touched())} replica(s): {reason}")
        return self._advance(cand, now) + [Notify()]

    def _finish(self, cand: DesiredState, outcome: Outcome, now: float, reason: str | None = None) -> list:
        op = cand.operation
        kind, version = op.kind, op.version
        if outcome in (Outcome.OK, Outcome.PREEMPTED):
            if kind == OpKind.ROLL:
                if cand.stable != version:
                    _push_previous(cand, cand.stable)
                cand.stable = version
                _clear_canary(cand)
            elif kind == OpKind.CANARY:
                cand.canary, cand.canary_percent, cand.canary_replicas = version, op.percent, sorted(op.done)
                cand.rebalance_blocked = None
            elif kind == OpKind.PROMOTE:
                _push_previous(cand, cand.stable)
                cand.stable = version
                _clear_canary(cand)
            elif kind == OpKind.ROLLBACK:
                if cand.canary is not None:
                    _clear_canary(cand)
                else:
                    cand.stable = cand.previous_stable.pop()
            elif kind == OpKind.REBALANCE and cand.canary is not None:
                if version == cand.canary:
                    # preempted: the replicas still swapping to the canary count as canary, so a rollback moves them
                    moved = set(op.done) | (set(op.moving) if outcome == Outcome.PREEMPTED else set())
                    cand.canary_replicas = sorted(set(cand.canary_replicas) | moved)
                else:
                    cand.canary_replicas = [r for r in cand.canary_replicas if r not in op.done]
            cand.rejected.pop(version.key, None)
        elif kind in (OpKind.ROLL, OpKind.CANARY):
            _reject(cand, version, [reason or "reverted"], now)
        elif kind == OpKind.REBALANCE and cand.canary is not None:
            cand.rebalance_blocked = cand.canary.key  # not the canary's fault as a version: not rejected
        elapsed_ms = (now - op.started) * 1e3
        _record(cand, kind.value, version, outcome, op.done, now, elapsed_ms, reason=reason, op_id=op.id)
        cand.operation = None
        result = {"id": op.id, "kind": kind.value, "version": version.to_dict(), "outcome": outcome.value,
                  "swapped": list(op.done), "dropped": list(op.dropped), "ms": round(elapsed_ms, 1),
                  "events": list(op.events)}
        error = None
        if outcome == Outcome.REVERTED:
            error = RolloutError(f"{kind.value} of {version.short()} failed and was reverted: {reason}")
        return [Reply(op.id, outcome, result, error), Notify()]

    # --- upkeep ---------------------------------------------------------------------------------------

    def _upkeep(self, cand: DesiredState, now: float) -> list:
        """No operation: keep the canary's share (replicas gone from it are replaced, extra ones trimmed)."""
        if cand.canary is None or not self.registry.settled(now):
            return []
        reg = self.registry
        cand.canary_replicas = [r for r in cand.canary_replicas if not reg.is_gone(r, now)]
        if cand.rebalance_blocked == cand.canary.key:
            return []
        live = reg.serving(now)
        if not live:
            return []
        have = [r for r in live if r in cand.canary_replicas]
        want = canary_count(cand.canary_percent or 0.0, len(live))
        if len(have) < want:
            pool = [r for r in live if r not in cand.canary_replicas]
            targets, version = pool[len(pool) - (want - len(have)):], cand.canary
        elif len(have) > want:
            targets, version = have[want:], cand.stable
        else:
            return []
        if not targets:
            return []
        op = self._operation(cand, self.new_id(), OpKind.REBALANCE, version, targets, now, everyone=False)
        cand.operation = op
        _event(op, f"canary share {len(have)}/{len(live)} replicas, {want} wanted for {cand.canary_percent:g}%: "
                   f"moving {', '.join(targets)} to {version.short()}")
        return self._advance(cand, now) + [Notify()]

    def _changed(self, cand: DesiredState, actions: list) -> Transition | None:
        if not actions and cand.same_as(self.state):
            return None
        return Transition(cand, on_commit=actions)


def _base_rule(s: DesiredState, replica_id: str) -> AdapterVersion:
    if s.canary is not None and replica_id in s.canary_replicas:
        return s.canary
    return s.stable


def _revert_scope(op: Operation) -> list[str]:
    """The replicas a revert looks at: every target (those it did not touch only while they may run the version)."""
    return list(op.targets)


def _back(report: ReplicaReport | None, previous: AdapterVersion) -> bool:
    """A reverted replica is back: idle on its previous version. One that names it while swapping may be about to
    flip to the new one (with two slots the old version stays active until the new one passed its check)."""
    return report is not None and report.running == previous and report.phase == ReplicaPhase.IDLE


def _handed(reg, replica_id: str) -> AdapterVersion | None:
    """The version last handed to the replica by this controller (None before its first answer to it)."""
    seen = reg.seen(replica_id)
    return seen.handed[0] if seen is not None and seen.handed is not None else None


def _token(report: ReplicaReport) -> str:
    return report.failed_token


def _clear_canary(s: DesiredState) -> None:
    s.canary, s.canary_percent, s.canary_replicas, s.rebalance_blocked = None, None, [], None


def _push_previous(s: DesiredState, version: AdapterVersion) -> None:
    s.previous_stable.append(version)
    del s.previous_stable[:-_PREVIOUS_STABLE_KEPT]


def _reject(s: DesiredState, version: AdapterVersion, problems: list[str], now: float) -> None:
    s.rejected.pop(version.key, None)
    s.rejected[version.key] = {**version.to_dict(), "problems": list(problems), "time": now}
    s.trim()


def _record(s: DesiredState, kind: str, version: AdapterVersion, outcome: Outcome, replicas: list[str],
            now: float, ms: float, reason: str | None = None, op_id: str | None = None) -> None:
    entry = {"time": now, "kind": kind, **version.to_dict(), "result": outcome.value,
             "replicas": list(replicas), "ms": round(ms, 1)}
    signer = s.validated.get(version.key, {}).get("signer")
    if signer:
        entry["signer"] = signer  # the key id that signed this version (when signatures are checked)
    if reason:
        entry["reason"] = reason
    if op_id:
        entry["id"] = op_id
    s.history.append(entry)
    s.trim()


def _event(op: Operation, message: str) -> None:
    op.events.append(message)


def _ms(report: ReplicaReport, key: str) -> str:
    value = report.stats.get(key) if report.stats else None
    return "-" if value is None else f"{value:.2f}"


def _save_error(error: BaseException) -> HotswapError:
    if isinstance(error, HotswapError):
        return error
    if isinstance(error, SaveOutcomeUnknown):  # it may have landed: say so, not "nothing moved"
        return ControllerUnavailableError(
            f"the state store did not confirm the save that starts this operation ({error}), so whether it started "
            "is not known: the controller saves its own state again as soon as the store answers (then it has not "
            "started), unless it restarts first (then it runs); 'hotswap status' shows which"
        )
    return RolloutConflictError(
        f"the operation was not started: the controller could not save its state ({type(error).__name__}: "
        f"{error}); nothing moved, retry when the state store is reachable"
    )
