"""Pinned cases for the rollout state machine: one per defect of the v1 controller that the machine's
design removes, each named by the defect, each with the simulator checking every invariant.

A control beside each case puts the old behaviour back into the machine (by patching one method) and
shows the same schedule then breaks an invariant or the case's assertion, so the case can fail.
"""

from __future__ import annotations

import pytest

from hotswap.messages import OpKind, Outcome, Phase
from hotswap.rollout import RolloutMachine
from tests.simulator import LIVENESS_S, SETTLE_S, SWAP_TIMEOUT_S, VERSIONS, Violation, World

V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]


def _running(world: World) -> dict[str, str]:
    return {r.id: r.running.uri for r in world.live()}


# --- defect 2: one failed save wedged every later operation -----------------------------------------------

def test_a_failed_save_fails_the_operation_cleanly_and_the_next_one_runs():
    world = World(replicas=3)
    before = world.controller.sm.state.to_json()
    world.fail_saves(1)
    assert world.request(OpKind.ROLL, "v2") is not None  # proposed ...
    assert world.controller.sm.state.operation is None  # ... but not committed: nothing in progress
    assert world.controller.sm.state.to_json() == before
    reply = world.completed[-1]
    assert reply.outcome == Outcome.ABORTED and "could not save its state" in str(reply.error)
    world.request(OpKind.ROLL, "v2")
    world.quiesce()
    assert world.controller.sm.state.stable == V2 and set(_running(world).values()) == {V2.uri}


def test_saves_failing_mid_operation_delay_it_but_lose_nothing():
    world = World(replicas=3)
    world.request(OpKind.ROLL, "v2")
    world.advance(1)
    world.fail_saves(3)
    world.advance(3)
    world.quiesce()
    assert world.controller.sm.state.stable == V2


# --- defect 4: a replica registering during a rollback got the version being rolled back ---------------------

def _canary_then_slow_rollback() -> World:
    world = World(replicas=3)
    world.request(OpKind.CANARY, "v2", 34)
    world.quiesce()
    canary = next(r for r in world.live() if r.running == V2)
    canary.slowness = 5  # its swap back takes a while: the rollback is in progress
    world.request(OpKind.ROLLBACK)
    world.advance(2)
    assert world.controller.sm.state.operation.kind == OpKind.ROLLBACK
    return world


def test_a_replica_registering_during_a_canary_rollback_starts_on_stable():
    world = _canary_then_slow_rollback()
    newcomer = world.add_replica()
    assert world.replicas[newcomer].running == V1
    world.quiesce()
    assert set(_running(world).values()) == {V1.uri}


def test_a_replica_registering_during_a_rollback_of_a_roll_starts_on_the_version_rolled_back_to():
    """The v1 controller handed it ``state.stable`` (still the version being rolled back) and never moved it;
    reproduced on the v1 code by a script driving the old actor (scenario B)."""
    world = World(replicas=2)
    world.request(OpKind.ROLL, "v2")
    world.quiesce()
    for r in world.live():
        r.slowness = 5
    world.request(OpKind.ROLLBACK)
    world.advance(2)
    assert world.controller.sm.state.operation.kind == OpKind.ROLLBACK
    newcomer = world.add_replica()
    assert world.replicas[newcomer].running == V1
    world.quiesce()
    assert world.controller.sm.state.stable == V1 and set(_running(world).values()) == {V1.uri}


# --- defect 6: a replica that drained longer than the liveness was counted as moved --------------------------

def test_a_replica_swapping_longer_than_liveness_is_not_counted_done_before_it_reports():
    world = World(replicas=2)
    slow = world.replicas["r1"]
    slow.slowness = int(LIVENESS_S * 2)  # it heartbeats (phase SWAPPING) all along
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(int(LIVENESS_S * 2) + 5)
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.OK and sorted(reply.result["swapped"]) == ["r0", "r1"]
    assert reply.result["dropped"] == []


def test_control_a_replica_silent_while_it_swaps_is_dropped_not_counted_done(monkeypatch):
    """Without heartbeats during the swap, the same replica looks gone: it is dropped, never 'done'."""
    world = World(replicas=2)
    slow = world.replicas["r1"]
    slow.slowness = int(LIVENESS_S * 2)
    step = World._replica_step

    def silent_while_busy(self, replica):
        if replica.applying is not None and replica.applying[2] > 0:
            replica.applying = (*replica.applying[:2], replica.applying[2] - 1)
            return  # no report while busy: the v1 replica's behaviour
        step(self, replica)

    monkeypatch.setattr(World, "_replica_step", silent_while_busy)
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(int(LIVENESS_S * 2) + 5)
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert "r1" in reply.result["dropped"] and "r1" not in reply.result["swapped"]


# --- defect 7: a controller restart during a revert resumed the forward rollout -------------------------------

def test_a_restart_during_a_revert_finishes_the_revert():
    world = World(replicas=3, batch_size=1)
    world.bad.add(V2)
    world.replicas["r1"].slowness = 3  # r0 moves, r1 fails slowly ...
    world.bad.discard(V2)
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(2)
    world.bad.add(V2)
    for _ in range(20):
        world.advance(1)
        op = world.controller.sm.state.operation
        if op is not None and op.phase == Phase.REVERT:
            break
    assert world.controller.sm.state.operation.phase == Phase.REVERT
    world.crash_controller()  # ... and the controller dies mid-revert
    assert world.controller.sm.state.operation.phase == Phase.REVERT
    world.quiesce()
    assert world.controller.sm.state.stable == V1 and set(_running(world).values()) == {V1.uri}
    assert any(r.outcome == Outcome.REVERTED and r.op_id == op_id for r in world.completed)


def test_control_resuming_a_revert_as_forward_is_caught(monkeypatch):
    resume = RolloutMachine.resume

    def forward_again(self, now):  # the v1 controller: a restart re-ran the forward rollout
        transition = resume(self, now)
        if transition is not None:
            transition.state.operation.phase = Phase.FORWARD
        return transition

    monkeypatch.setattr(RolloutMachine, "resume", forward_again)
    with pytest.raises((AssertionError, Violation)):
        test_a_restart_during_a_revert_finishes_the_revert()


# --- defect 8: replicas not live when an operation started were never moved -----------------------------------

def test_a_replica_stalled_when_a_roll_starts_converges_when_it_returns():
    world = World(replicas=3)
    world.stall("r2", True)
    world.request(OpKind.ROLL, "v2")
    world.advance(int(LIVENESS_S) + 2)  # r2 is dropped from the operation as gone ...
    world.stall("r2", False)  # ... and comes back
    world.quiesce()
    assert set(_running(world).values()) == {V2.uri}


# --- defect 12: an upkeep refill blocked a user's rollback; a failed refill rejected the canary ---------------

def _canary_losing_its_replica() -> World:
    world = World(replicas=3)
    world.request(OpKind.CANARY, "v2", 34)
    world.quiesce()
    canary = next(r for r in world.live() if r.running == V2)
    world.kill(canary.id)
    for r in world.live():
        r.slowness = 10
    world.advance(int(LIVENESS_S) + 3)
    assert world.controller.sm.state.operation.kind == OpKind.REBALANCE
    return world


def test_a_users_rollback_preempts_an_upkeep_refill():
    world = _canary_losing_its_replica()
    assert world.request(OpKind.ROLLBACK) is not None  # accepted, not "a rollout is in progress"
    s = world.controller.sm.state
    assert s.operation is None or s.operation.kind == OpKind.ROLLBACK
    assert ("rebalance", "preempted") in [(h["kind"], h["result"]) for h in s.history]
    # the replica the refill was moving to the canary is part of the rollback (review: it was left on the canary)
    assert s.operation is not None and len(s.operation.targets) == 1  # the dead canary replica is gone
    world.quiesce()
    s = world.controller.sm.state
    assert s.canary is None and set(_running(world).values()) == {V1.uri}


def test_a_failed_refill_does_not_reject_the_canary_and_is_not_retried_replica_after_replica():
    world = _canary_losing_its_replica()
    world.bad.add(V2)  # the refill's smoke check fails
    for r in world.live():
        r.slowness = 0
    world.advance(15)
    s = world.controller.sm.state
    assert s.operation is None and V2.key not in s.rejected and s.rebalance_blocked == V2.key
    assert s.canary == V2  # still the canary; its surviving share stays as it is
    swaps = sum(len(r.swaps) for r in world.live())
    world.advance(30)
    assert sum(len(r.swaps) for r in world.live()) == swaps  # no retry on another replica


# --- defect 13: rejected versions keyed inconsistently, never cleared ------------------------------------------

def test_a_rejection_is_keyed_by_identity_and_cleared_by_a_later_good_roll():
    world = World(replicas=2)
    world.bad.add(V2)
    world.request(OpKind.ROLL, "v2")
    world.advance(5)
    assert V2.key in world.controller.sm.state.rejected
    world.bad.clear()
    world.request(OpKind.ROLL, "v2")  # the same identity, now good (a transient smoke-check failure)
    world.quiesce()
    s = world.controller.sm.state
    assert s.stable == V2 and V2.key not in s.rejected


# --- fencing (defect 11) and the canary share ------------------------------------------------------------------

def test_a_taken_over_controller_is_fenced_and_serves_no_operation():
    world = World(replicas=2)
    world.takeover()
    world.request(OpKind.ROLL, "v2")
    world.advance(3)
    zombie = world.zombie.sm
    zombie.heard(world.replicas["r0"].report(), world.now)  # still hears an old heartbeat
    world.zombie.run(zombie.tick(world.now + 100))
    world.quiesce()
    assert world.controller.sm.state.stable == V2


def test_control_an_unfenced_store_lets_the_zombie_overwrite(monkeypatch):
    from tests import simulator

    def unfenced_save(self, state):
        b = self.backend
        state.generation = b.generation + 1
        b.raw, b.generation, self.seen = state.to_json(), state.generation, state.generation

    monkeypatch.setattr(simulator.FakeStore, "save", unfenced_save)
    with pytest.raises(Violation, match="zombie"):
        world = World(replicas=2)
        world.takeover()
        world.request(OpKind.ROLL, "v2")
        world.advance(3)
        world.zombie.run(world.zombie.sm.request(OpKind.ROLL, V3, world.now))


def test_canary_share_is_kept_when_its_replica_dies():
    world = World(replicas=4)
    world.request(OpKind.CANARY, "v2", 50)
    world.quiesce()
    victim = next(r for r in world.live() if r.running == V2)
    world.kill(victim.id)
    world.add_replica()
    world.quiesce()
    assert sum(r.running == V2 for r in world.live()) == 2


def test_a_step_with_no_answer_reverts_within_the_swap_timeout():
    world = World(replicas=2)
    world.replicas["r0"].slowness = int(SWAP_TIMEOUT_S * 3)
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(int(SWAP_TIMEOUT_S) + 3)
    assert world.controller.sm.state.operation.phase == Phase.REVERT  # the step timed out ...
    world.advance(int(SWAP_TIMEOUT_S) + 3)  # ... and the revert has its own deadline (r0 is still swapping)
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.REVERTED and "swap_timeout_s" in str(reply.error)


# --- review findings on v2 ---------------------------------------------------------------------------------

def test_a_version_that_kills_its_replicas_is_reverted_not_made_stable():
    """Review 1: every targeted replica went away mid-swap and the roll still committed the version."""
    world = World(replicas=3)
    world.deadly.add(V2)
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(40)
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.REVERTED and "went away while swapping" in str(reply.error)
    assert world.controller.sm.state.stable == V1 and V2.key in world.controller.sm.state.rejected
    world.quiesce()
    assert set(_running(world).values()) == {V1.uri}


def test_a_failed_smoke_check_is_seen_even_if_a_heartbeat_named_the_version_first():
    """Review 2: the engine names the new version during its smoke check; that report must not count as done."""
    world = World(replicas=2)
    world.bad.add(V2)
    world.replicas["r0"].slowness = 3  # heartbeats with running=v2, phase SWAPPING, for three ticks
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(10)
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.REVERTED and reply.result["swapped"] == []


def test_a_replica_joining_late_in_a_step_gets_its_own_swap_timeout():
    """Review 5: a joiner inherited the step's old deadline and the whole roll reverted."""
    world = World(replicas=1)
    world.replicas["r0"].slowness = int(SWAP_TIMEOUT_S) - 4
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(int(SWAP_TIMEOUT_S) - 2)
    late = world.add_replica()
    world.replicas[late].slowness = 0
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.OK


def test_a_returning_dropped_replica_that_runs_the_version_is_counted_not_swapped_back():
    """Review 11: a dropped target back already running the version was sent back to the old stable."""
    world = World(replicas=2)
    world.replicas["r1"].slowness = 2
    world.request(OpKind.ROLL, "v2")
    world.advance(1)
    world.stall("r1", True)  # it finishes its swap, unheard, and comes back after it was dropped
    world.replicas["r1"].running, world.replicas["r1"].applying = V2, None
    world.advance(int(LIVENESS_S) + 2)
    world.stall("r1", False)
    swaps = len(world.replicas["r1"].swaps)
    world.quiesce()
    assert world.controller.sm.state.stable == V2 and len(world.replicas["r1"].swaps) == swaps


# --- the first roll after a fresh start waited for the settle time ---------------------------------------------

def _roll_ticks(world: World) -> int:
    """Ticks from a roll of v2 to its reply (bounded)."""
    op_id = world.request(OpKind.ROLL, "v2")
    for ticks in range(1, 4 * int(SETTLE_S) + 10):
        world.advance(1)
        if any(r.op_id == op_id for r in world.completed):
            return ticks
    raise AssertionError("the roll never ended")


def test_a_roll_right_after_a_fresh_start_ends_when_its_replicas_moved_not_after_the_settle_time():
    """A controller on a state nobody ever saved finished a roll moving everyone only once ``settle_s`` (two
    watch timeouts, 10 s by default) had passed since it started: the first roll of a new deployment took
    ~5 s instead of ~0.1 s. No replica can be unheard then (each registers before it serves)."""
    world = World(replicas=2)
    assert _roll_ticks(world) < SETTLE_S
    world.quiesce()
    assert world.controller.sm.state.stable == V2 and set(_running(world).values()) == {V2.uri}


def test_control_a_restarted_controller_still_waits_the_settle_time_for_replicas_it_has_not_heard():
    """The settle time stays where it is needed: a controller that loads a saved state may have replicas
    serving that have not reported to it yet, so an operation moving everyone waits for them."""
    world = World(replicas=2)
    world.crash_controller()
    assert _roll_ticks(world) > SETTLE_S
    world.quiesce()
    assert world.controller.sm.state.stable == V2


def test_a_controller_in_a_new_cluster_does_not_wait_the_settle_time():
    """The second `serve run` on the same state_uri (a new Ray cluster, whose replicas all register with the new
    controller) waited the settle time like a restart inside a running cluster: ``82bac2a`` spared only a state never
    saved, so every `serve run` after the first still waited up to two watch timeouts (the outside review)."""
    world = World(replicas=2)
    world.new_cluster()
    assert _roll_ticks(world) < SETTLE_S
    world.quiesce()
    assert world.controller.sm.state.stable == V2 and set(_running(world).values()) == {V2.uri}


@pytest.mark.parametrize(("generation", "saved_in", "waits"), [
    (0, None, False),  # never saved: nobody could have been assigned anything from it
    (3, "session-a", True),  # a restart inside the cluster that claimed it: its replicas may not have reported yet
    (3, "session-b", False),  # claimed in another cluster: those replicas ended with it
    (3, None, True),  # saved by a release that did not record the cluster: waited for, as before
])
def test_who_may_be_unheard_after_a_start(generation, saved_in, waits):
    from hotswap.state import DesiredState

    sm = RolloutMachine(DesiredState(generation=generation, cluster=saved_in), batch_size=1, swap_timeout_s=20,
                        liveness_s=8, forget_after_s=60, settle_s=3, now=0.0, new_id=lambda: "x", cluster="session-a")
    assert sm.registry.settled(1.0) is not waits
    assert sm.claim(1.0).state.cluster == "session-a"


def _restart_after_another_cluster_claimed(*, restarted: bool) -> World:
    """A roll to v2 has moved r0; v2 then fails the smoke check on r1 and r2. Meanwhile a controller in another
    cluster claimed the shared state (an upgrade held back), and Ray restarts this cluster's controller."""
    from tests.simulator import SimController

    world = World(replicas=3)
    for r in ("r1", "r2"):
        world.replicas[r].slowness = 3
    world.request(OpKind.ROLL, "v2")
    while "r0" not in world.controller.sm.state.operation.done:
        world.advance(1)
    world.bad.add(V2)
    home, world.cluster = world.cluster, "another-cluster"
    SimController(world, "elsewhere")  # claims the state for the other cluster
    world.cluster = home
    world.trace.append("crash controller")
    world.controller = SimController(world, "restarted", restarted=restarted)
    for _ in range(40):  # not quiesce: that would clear the smoke-check failure
        world.advance(1)
        if world.controller.sm.state.operation is None:
            break
    return world


def test_a_controller_restarted_by_ray_waits_the_settle_time_even_if_another_cluster_claimed_the_state():
    """The outside review of the rule above: after another cluster claimed the state, a controller that Ray restarted
    in the old cluster skipped the settle wait, judged its unheard replicas gone, and made a version that failed
    on them stable."""
    world = _restart_after_another_cluster_claimed(restarted=True)
    assert world.controller.sm.state.stable == V1
    assert world.controller.sm.state.history[-1]["result"] == "reverted"


def test_control_a_restart_not_known_as_one_makes_the_failing_version_stable():
    world = _restart_after_another_cluster_claimed(restarted=False)
    assert world.controller.sm.state.stable == V2  # r1 and r2 were dropped unheard: the check never ran there


# --- found by tests/integration/test_faults.py: a heartbeat overtaken by the ack that followed it ---------------

def _overtaken_heartbeat_then_a_failure(world: World) -> None:
    """r0's heartbeat as it starts swapping to v2 ("v1, swapping") arrives two ticks late, after its ack: r0 is done
    and r1 swaps next, fails its smoke check, and the roll reverts; then the stale heartbeat lands."""
    world.request(OpKind.ROLL, "v2")
    world.delay("r0", 2)
    world.replicas["r1"].slowness = 1
    world.advance(1)  # r0 swaps; its ack arrives, its heartbeat is late; r1 starts its (slow) swap
    world.bad.add(V2)
    world.advance(2)  # r1 fails its check and the roll reverts; then r0's stale heartbeat arrives


def test_a_stale_heartbeat_does_not_count_a_replica_as_reverted():
    """Two slots: a replica names its active (old) version while it swaps. The stale heartbeat said r0 runs v1, so
    the revert counted r0 back at once and answered 'reverted' while r0 still served v2."""
    world = World(replicas=3, two_slots=True)
    _overtaken_heartbeat_then_a_failure(world)
    world.quiesce()
    reply = world.completed[-1]
    assert reply.outcome == Outcome.REVERTED and "injected smoke-check failure" in str(reply.error)
    assert set(_running(world).values()) == {V1.uri}
    assert world.replicas["r0"].swaps[-1][1] == V1  # r0 was swapped back before the reply


def _a_late_idle_report_then_a_failure(world: World) -> None:
    """r0's "v1, idle" from before the roll (the report its watch carries) arrives three ticks late: after r0
    moved to v2, and after r1's failed check turned the roll to revert."""
    world.delay("r0", 3)
    world.advance(1)
    world.request(OpKind.ROLL, "v2")
    world.replicas["r1"].slowness = 1
    world.advance(1)  # r0 swaps to v2 and is done; r1 starts a slow swap
    world.bad.add(V2)
    world.advance(2)  # r1 fails and the roll reverts; r0's late report lands


def test_a_report_older_than_the_last_one_heard_is_ignored():
    world = World(replicas=3, two_slots=True)
    _a_late_idle_report_then_a_failure(world)
    assert world.controller.sm.state.operation is not None  # r0 is not back: no answer yet
    world.quiesce()
    assert world.completed[-1].outcome == Outcome.REVERTED
    assert set(_running(world).values()) == {V1.uri}
    assert [v for _, v in world.replicas["r0"].swaps][-2:] == [V2, V1]


def test_a_late_report_does_not_bring_back_a_replica_judged_gone():
    """From the review of the revert's un-drop: a report sent before the last one heard, landing after the replica
    was judged gone, made it live again (the un-drop then waited for a dead replica, or moved it again)."""
    from hotswap.messages import ReplicaPhase, ReplicaReport
    from hotswap.registry import ReplicaRegistry

    registry = ReplicaRegistry(liveness_s=8, forget_after_s=60, settle_s=0, started=0.0)
    registry.heard(ReplicaReport("r0", V1, seq=(1, 2)), 1.0)
    assert registry.is_gone("r0", 10.0)
    registry.heard(ReplicaReport("r0", V1, ReplicaPhase.SWAPPING, seq=(1, 1)), 10.0)  # sent before the one heard
    assert registry.is_gone("r0", 10.0) and registry.report("r0").seq == (1, 2)
    registry.heard(ReplicaReport("r0", V2, seq=(1, 3)), 11.0)
    assert registry.is_live("r0", 11.0) and registry.report("r0").running == V2


def _last_report_wins(self, report, now):
    """ReplicaRegistry.heard as it was before reports were numbered: the last report to arrive wins."""
    from hotswap.registry import ReplicaSeen

    seen = self._seen.get(report.replica_id)
    if seen is None:
        self._seen[report.replica_id] = ReplicaSeen(report, now, now)
        return True
    seen.report, seen.last_seen = report, now
    return False


def test_control_a_registry_that_keeps_the_last_report_to_arrive_answers_reverted_too_early(monkeypatch):
    """Control: the registry as it was (the last report to arrive wins), and no record of what was handed out (the
    late report lands while r0 is still due its forward assignment's ack, so that record alone also holds the revert
    back); the revert's own rule still stands."""
    from hotswap.registry import ReplicaRegistry

    monkeypatch.setattr(ReplicaRegistry, "heard", _last_report_wins)
    monkeypatch.setattr(ReplicaRegistry, "in_flight", lambda self, replica_id: None)
    with pytest.raises(Violation, match="answered 'reverted' while r0 runs s3://bkt/v2"):
        _a_late_idle_report_then_a_failure(World(replicas=3, two_slots=True))


def _reverted_only_once_back(world: World, schedule, rid: str, reason: str) -> None:
    """``schedule`` turns the roll of v2 to revert while ``rid`` is on its way to v2: no answer until it applied v2
    and went back; then everyone runs v1."""
    schedule(world)
    assert world.controller.sm.state.operation.phase == Phase.REVERT  # rid is not back yet: no answer yet
    world.quiesce()
    reply = world.completed[-1]
    assert reply.outcome == Outcome.REVERTED and reason in str(reply.error)
    assert set(_running(world).values()) == {V1.uri}
    assert [v for _, v in world.replicas[rid].swaps][-2:] == [V2, V1]  # it got to v2, then went back


def _a_swap_still_in_flight_when_the_roll_reverts(world: World) -> None:
    """Two replicas swap together to v2; r1 hangs (never answers) and r0 is slow, still swapping when the step's
    deadline passes and the roll reverts."""
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = int(SWAP_TIMEOUT_S) + 5
    world.stall("r1", True)
    world.advance(int(SWAP_TIMEOUT_S) + 2)


def test_a_replica_still_swapping_forward_is_not_counted_as_reverted():
    """With two slots a swapping replica names its old (active) version: the revert counted r0 back at once and
    answered 'reverted', and r0 then flipped to v2."""
    _reverted_only_once_back(World(replicas=3, batch_size=2, two_slots=True),
                             _a_swap_still_in_flight_when_the_roll_reverts, "r0", "no answer within swap_timeout_s")


def test_control_a_revert_that_counts_a_swapping_replica_as_back_answers_too_early(monkeypatch):
    """Control: the revert's old rule (any report naming the previous version, swapping or not)."""
    import hotswap.rollout

    monkeypatch.setattr(hotswap.rollout, "_back", lambda report, previous: report is not None
                        and report.running == previous)
    world = World(replicas=3, batch_size=2, two_slots=True)
    with pytest.raises(Violation, match="answered 'reverted' while r0 runs s3://bkt/v1.* and swaps to s3://bkt/v2"):
        _a_swap_still_in_flight_when_the_roll_reverts(world)


def test_a_replica_failed_forward_on_its_previous_version_ends_the_revert_at_once():
    """One slot, the copy of v2 failed and so did the restore: the replica reports v1, FAILED, with the forward
    token. The IDLE rule alone left the revert waiting for it until it was gone (it is never handed the revert:
    it already names v1), refusing every other operation meanwhile (found by an outside review of c3c4b5d)."""
    from hotswap.messages import ReplicaPhase, ReplicaReport
    from hotswap.rollout import Reply
    from hotswap.state import DesiredState

    state = DesiredState()
    state.stable = V1
    sm = RolloutMachine(state, batch_size=1, swap_timeout_s=120, liveness_s=30, forget_after_s=120, settle_s=0,
                        now=0.0, new_id=lambda: "op1")

    def run(transition):
        return sm.commit(transition) if transition else []

    for rid in ("r1", "r2"):
        run(sm.heard(ReplicaReport(rid, V1, seq=(1, 1)), 0.0))
    run(sm.request(OpKind.ROLL, V2, 1.0, op_id="op1"))
    failed = ReplicaReport("r1", V1, ReplicaPhase.FAILED, failed=V2, failure="restore failed",
                           failed_token="op1:forward", seq=(1, 5))
    actions = run(sm.heard(failed, 2.0))
    assert sm.state.operation is None
    reply = next(a for a in actions if isinstance(a, Reply))
    assert reply.outcome == Outcome.REVERTED and reply.result["dropped"] == []
    assert any(e.startswith(f"r1: failed {V2.short()} and could not restore {V1.short()} (restore failed)")
               for e in reply.result["events"]), reply.result["events"]


# --- an assignment handed out but not yet applied: the replica's last report said nothing of it ---------------

def _an_assignment_in_flight_when_the_roll_reverts(world: World) -> None:
    """Batch of two: r0 and r1 are handed v2 together. r1's answer takes three ticks to reach it, while its last
    report ("v1, idle", carried by the watch that got the answer) stands; r0's check fails meanwhile."""
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = 1
    world.hold("r1", 3)
    world.bad.add(V2)
    world.advance(1)  # both handed v2: r0 starts a slow swap, r1's assignment is on its way
    world.advance(2)  # r0 fails its check: the roll reverts
    world.bad.clear()  # r1's copy of v2 will pass its check


def test_a_replica_handed_the_version_is_not_counted_as_reverted_before_it_reports_again():
    """Found by an outside review: the revert counted r1 back on its "v1, idle" report and answered 'reverted'; r1
    then received and applied v2."""
    _reverted_only_once_back(World(replicas=3, batch_size=2), _an_assignment_in_flight_when_the_roll_reverts, "r1",
                             "injected smoke-check failure")


def test_control_a_revert_blind_to_assignments_in_flight_answers_too_early(monkeypatch):
    """Control: no record of what was handed out (the revert as it was)."""
    from hotswap.registry import ReplicaRegistry

    monkeypatch.setattr(ReplicaRegistry, "in_flight", lambda self, replica_id: None)
    with pytest.raises(Violation, match="answered 'reverted' while r1 runs s3://bkt/v1 .* and swaps to s3://bkt/v2"):
        _an_assignment_in_flight_when_the_roll_reverts(World(replicas=3, batch_size=2))


def test_a_replica_joining_with_the_version_in_flight_is_waited_for_by_the_revert():
    """A replica that registers mid-roll is handed the version in the answer to its register; until its next report
    it may be applying it."""
    world = World(replicas=2)
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = 2
    world.advance(1)  # r0 starts a slow swap
    sm = world.controller.sm
    from hotswap.messages import ReplicaReport

    sm.registry.heard(ReplicaReport("r9", V1, seq=(7, 1)), world.now)
    world.controller.run(sm.heard(ReplicaReport("r9", V1, seq=(7, 1)), world.now))
    assert sm.assignment("r9") == V2
    sm.registry.hand("r9", V2, (7, 1))  # what the controller's register does as it answers
    world.bad.add(V2)
    world.advance(3)  # r0 fails: the roll reverts; r9 has said nothing since its register
    assert sm.state.operation is not None and sm.state.operation.phase == Phase.REVERT
    world.controller.run(sm.heard(ReplicaReport("r9", V2, seq=(7, 2)), world.now))  # it applied v2
    assert sm.state.operation is not None and sm.assignment("r9") == V1
    world.controller.run(sm.heard(ReplicaReport("r9", V1, seq=(7, 3)), world.now))  # and went back
    assert sm.state.operation is None and world.completed[-1].outcome == Outcome.REVERTED


# --- a target dropped mid-swap that came back is not moving any more, yet may run the version --------------------

def _a_dropped_target_back_on_the_version_then_a_failure(world: World) -> None:
    """Batch of two: r1 stalls mid-swap and is dropped, finishes v2 unheard, and comes back while r0 still swaps; it
    is sent back to v1 (it waits its turn), slowly. Then r0's check fails."""
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = int(LIVENESS_S) + 6
    world.replicas["r1"].slowness = 2
    world.advance(1)
    world.stall("r1", True)
    world.replicas["r1"].running, world.replicas["r1"].applying = V2, None  # it finished its swap, unheard
    world.advance(int(LIVENESS_S) + 2)  # r1 is dropped
    world.replicas["r1"].slowness = 6  # its swap back to v1 takes a while
    world.stall("r1", False)
    world.bad.add(V2)
    world.advance(5)  # r1 reports v2 (back in the roll, not moving) and starts back to v1; r0 fails: revert


def test_a_dropped_target_that_came_back_on_the_version_is_waited_for_by_the_revert():
    """Found by an outside review: the revert looked only at replicas counted moving or done, answered 'reverted'
    while r1 still ran v2."""
    world = World(replicas=3, batch_size=2)
    _a_dropped_target_back_on_the_version_then_a_failure(world)
    world.quiesce()
    assert world.completed[-1].outcome == Outcome.REVERTED
    assert set(_running(world).values()) == {V1.uri}


def test_control_a_revert_that_looks_only_at_replicas_it_touched_answers_too_early(monkeypatch):
    import hotswap.rollout

    monkeypatch.setattr(hotswap.rollout, "_revert_scope", lambda op: op.touched())
    with pytest.raises(Violation, match="answered 'reverted' while r1 runs s3://bkt/v2"):
        _a_dropped_target_back_on_the_version_then_a_failure(World(replicas=3, batch_size=2))


def test_a_target_dropped_mid_swap_that_comes_back_during_the_revert_is_sent_back_before_the_reply():
    """Found by the review of the fix above: only the forward phase took a replica that reported again out of
    'dropped'; one back during the revert stayed dropped, and the roll answered 'reverted' while it served v2."""
    world = World(replicas=3, batch_size=3)
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = int(LIVENESS_S) + 4
    world.replicas["r1"].slowness = 2
    world.advance(1)  # all three handed v2; r2 is done at once
    world.stall("r1", True)
    world.replicas["r1"].running, world.replicas["r1"].applying = V2, None  # r1 finished v2, unheard
    world.advance(int(LIVENESS_S) + 2)  # r1 is dropped
    world.bad.add(V2)
    world.replicas["r2"].slowness = 4  # r2's swap back takes a while
    world.advance(3)  # r0 fails its check: the roll reverts
    assert world.controller.sm.state.operation.dropped == ["r1"]
    world.replicas["r1"].slowness = 10
    world.stall("r1", False)  # r1 is back, idle on v2, while the revert waits for r2
    world.quiesce()
    reply = world.completed[-1]
    assert reply.outcome == Outcome.REVERTED and reply.result["dropped"] == []
    assert set(_running(world).values()) == {V1.uri}
    assert "r1: reported in again; back in the revert" in reply.result["events"]


def test_a_target_back_in_the_revert_and_not_heard_after_a_restart_holds_the_answer_until_settled():
    """Found by the review of the fix above: r1 came back in the revert (on v2, swapping back slowly), went quiet
    again, and the controller restarted. The new registry had no report for r1, and an untouched target without one
    neither held the revert nor was dropped (not before the settle time): 'reverted' while r1 ran v2."""
    world = World(replicas=3, batch_size=3)
    world.request(OpKind.ROLL, "v2")
    world.replicas["r0"].slowness = int(LIVENESS_S) + 4
    world.replicas["r1"].slowness = 2
    world.advance(1)
    world.stall("r1", True)
    world.replicas["r1"].running, world.replicas["r1"].applying = V2, None  # r1 finished v2, unheard
    world.advance(int(LIVENESS_S) + 2)  # r1 is dropped
    world.bad.add(V2)
    world.replicas["r2"].slowness = 3
    world.advance(3)  # r0 fails: the roll reverts; r2 swaps back slowly
    world.replicas["r1"].slowness = 30
    world.stall("r1", False)
    world.advance(1)  # r1 reports (swapping back to v1): back in the revert
    assert "r1" not in world.controller.sm.state.operation.dropped
    world.stall("r1", True)  # quiet again ...
    world.crash_controller()  # ... as the controller restarts
    world.advance(int(SETTLE_S) + 2)
    reply = world.completed[-1]
    assert reply.outcome == Outcome.REVERTED and reply.result["dropped"] == ["r1"]  # judged gone once settled
    world.quiesce()
    assert set(_running(world).values()) == {V1.uri}


def _a_late_idle_report_after_the_revert_handed_v1_back(world: World) -> None:
    """r0's "v1, idle" (the report its watch carried before the roll) lands five ticks late: after r0 moved to v2,
    after the revert handed v1 back to it (so nothing but v1 is in flight to r0), while its slow swap back runs."""
    world.delay("r0", 5)
    world.advance(1)
    world.request(OpKind.ROLL, "v2")
    world.replicas["r1"].slowness = 1
    world.advance(1)  # r0 swaps to v2 (done); r1 starts a slow swap
    world.bad.add(V2)
    world.replicas["r0"].slowness = 4
    world.advance(5)  # r1 fails: the roll reverts; r0 is handed v1 and swaps slowly; the stale report lands


def test_a_late_report_does_not_count_a_replica_swapping_back_as_back():
    world = World(replicas=3, two_slots=True)
    _a_late_idle_report_after_the_revert_handed_v1_back(world)
    world.quiesce()
    assert world.completed[-1].outcome == Outcome.REVERTED
    assert set(_running(world).values()) == {V1.uri}


def test_control_only_the_numbered_reports_keep_the_late_one_from_counting(monkeypatch):
    """Control (found by the review): with the last report to arrive winning again, and nothing else changed, the
    stale "v1, idle" counts r0 back while it still serves v2."""
    from hotswap.registry import ReplicaRegistry

    monkeypatch.setattr(ReplicaRegistry, "heard", _last_report_wins)
    with pytest.raises(Violation, match="answered 'reverted' while r0 runs s3://bkt/v2"):
        _a_late_idle_report_after_the_revert_handed_v1_back(World(replicas=3, two_slots=True))


def test_a_replica_whose_restore_failed_is_out_of_rotation_and_replaced():
    """The simulator's FAILED replica (one slot: the copy of v2 failed its check and v1 could not be put back): it
    reports FAILED on v1 with the forward token, the revert counts it out of rotation at once, Serve replaces it, and
    the replacement converges on v1."""
    world = World(replicas=3)
    world.bad.add(V2)
    world.unrestorable.add(V2)
    world.request(OpKind.ROLL, "v2")
    world.advance(1)
    reply = world.completed[-1]
    assert reply.outcome == Outcome.REVERTED
    assert any(e.startswith("r0: failed s3://bkt/v2") and "could not restore s3://bkt/v1" in e
               for e in reply.result["events"]), reply.result["events"]
    world.quiesce()
    assert not world.replicas["r0"].alive and len(world.live()) == 3
    assert set(_running(world).values()) == {V1.uri}


# --- a replica that stalls mid-swap and comes back (found while fixing op.deaths, stop 23) --------------------

def _stalled_mid_swap_and_back() -> tuple[World, str]:
    """r0 stalls while it swaps to v2: it is dropped as gone (counted as a death, its last report said SWAPPING)
    while r1 takes its turn; then r0 reports again, still swapping."""
    world = World(replicas=3)
    for replica in world.replicas.values():
        replica.slowness = 4
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(2)
    op = world.controller.sm.state.operation
    assert op.moving == ["r0"]
    world.stall("r0", True)
    world.advance(int(LIVENESS_S) + 1)
    op = world.controller.sm.state.operation
    assert op.dropped == ["r0"] and op.deaths == 1 and op.moving == ["r1"]
    world.stall("r0", False)
    world.advance(1)
    return world, op_id


def test_a_replica_back_from_a_stall_mid_swap_is_waited_for_not_swapped_back_and_forth():
    """It was sent the old version while it waited for its turn again, so it swapped v2 -> v1 -> v2 (the
    simulator's 'swapped twice for one operation'); now it is waited for as a replica moving now."""
    world, op_id = _stalled_mid_swap_and_back()
    op = world.controller.sm.state.operation
    assert "r0" in op.moving and op.deaths == 0  # a stall, not a death
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.OK and world.controller.sm.state.stable == V2
    assert [v for token, v in world.replicas["r0"].swaps if token.startswith(f"{op_id}:")] == [V2]
    assert world.replicas["r0"].swaps[-1] == (f"{op_id}:forward", V2)  # and nothing after it (no swap back)


def test_a_stall_and_one_death_do_not_revert_as_two_deaths():
    """A replica counted as a death that reports again was a stall: with one real death after it, the version is
    not reverted as one that kills its replicas (``_DEATHS_TO_REVERT`` is 2)."""
    world, op_id = _stalled_mid_swap_and_back()
    world.kill("r1")  # swapping to v2 when it dies
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.OK, reply.error
    assert "r1" in reply.result["dropped"] and world.controller.sm.state.stable == V2


def test_a_state_saved_before_died_was_kept_still_takes_a_stall_back():
    """An operation saved by a controller that did not record who died (an upgrade mid-roll): when every dropped
    target was a death they are exactly the ones, so the stall that comes back is still taken off the count."""
    import json

    world, op_id = _stalled_mid_swap_and_back_unheard()
    saved = json.loads(world.backend.raw)
    del saved["operation"]["died"]
    world.backend.raw = json.dumps(saved)
    world.crash_controller()  # the new release's controller starts on that state
    world.advance(1)
    world.stall("r0", False)
    world.advance(1)
    world.kill("r1")
    world.quiesce()
    reply = next(r for r in world.completed if r.op_id == op_id)
    assert reply.outcome == Outcome.OK, reply.error


def _stalled_mid_swap_and_back_unheard() -> tuple[World, str]:
    """As ``_stalled_mid_swap_and_back``, but r0 is still stalled (dropped, counted as a death)."""
    world = World(replicas=3)
    for replica in world.replicas.values():
        replica.slowness = 4
    op_id = world.request(OpKind.ROLL, "v2")
    world.advance(2)
    world.stall("r0", True)
    world.advance(int(LIVENESS_S) + 1)
    op = world.controller.sm.state.operation
    assert op.dropped == ["r0"] and op.died == ["r0"] and op.deaths == 1
    return world, op_id
