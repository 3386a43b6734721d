"""The rollout state machine under drawn schedules: operations interleaved with replica churn, stalls, slow
and failed swaps, controller crashes and takeovers, whole clusters replaced, failed state saves and failed fetches.

CI draws a fixed set of schedules; ``HOTSWAP_FUZZ=explore[:N]`` searches (see tests/fuzzing.py). Every
schedule a search breaks is pinned in ``tests/unit/test_rollout_cases.py``.
"""

from __future__ import annotations

import json
import os

from hypothesis import example, given
from hypothesis import strategies as st

from hotswap.messages import OpKind
from tests.fuzzing import fuzz_settings
from tests.simulator import VERSIONS, World

_URIS = sorted(VERSIONS)

_action = st.one_of(
    st.tuples(st.just("roll"), st.sampled_from(_URIS)),
    st.tuples(st.just("canary"), st.sampled_from(_URIS), st.sampled_from([10, 34, 50, 100])),
    st.tuples(st.just("promote")),
    st.tuples(st.just("rollback")),
    st.tuples(st.just("register")),
    st.tuples(st.just("kill"), st.integers(0, 20)),
    st.tuples(st.just("stall"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("slow"), st.integers(0, 20), st.integers(0, 30)),
    st.tuples(st.just("delay"), st.integers(0, 20), st.integers(1, 6)),
    st.tuples(st.just("hold"), st.integers(0, 20), st.integers(1, 4)),
    st.tuples(st.just("bad"), st.sampled_from(_URIS)),
    st.tuples(st.just("deadly"), st.sampled_from(_URIS)),
    st.tuples(st.just("unrestorable"), st.sampled_from(_URIS)),
    st.tuples(st.just("unfetchable"), st.sampled_from(_URIS)),
    st.tuples(st.just("crash")),
    st.tuples(st.just("takeover")),
    st.tuples(st.just("new_cluster")),
    st.tuples(st.just("fail_saves"), st.integers(1, 4)),
    st.tuples(st.just("lose_answers"), st.integers(1, 3)),
    st.tuples(st.just("tick"), st.integers(1, 12)),
)

_STATS = {"schedules": 0, "actions": 0, "ticks": 0, "completed": 0}  # completed: operations that ended


def play(world: World, actions) -> None:
    for action in actions:
        kind, *args = action
        ids = sorted(world.replicas)

        def pick(i: int, ids=ids) -> str | None:
            return ids[i % len(ids)] if ids else None

        if kind in ("roll", "canary"):
            world.request(OpKind(kind), args[0], args[1] if kind == "canary" else None)
        elif kind in ("promote", "rollback"):
            world.request(OpKind(kind))
        elif kind == "register":
            world.add_replica()
        elif kind == "kill" and ids and len(world.live()) > 1:
            world.kill(pick(args[0]))
        elif kind == "stall" and ids:
            world.stall(pick(args[0]), args[1])
        elif kind == "slow" and ids:
            world.replicas[pick(args[0])].slowness = args[1]
        elif kind == "delay" and ids:
            world.delay(pick(args[0]), args[1])
        elif kind == "hold" and ids:
            world.hold(pick(args[0]), args[1])
        elif kind == "bad":
            world.bad.add(VERSIONS[args[0]])
        elif kind == "deadly":
            world.deadly.add(VERSIONS[args[0]])
        elif kind == "unrestorable":  # a bad version whose failed copy also breaks the restore (one slot)
            world.bad.add(VERSIONS[args[0]])
            world.unrestorable.add(VERSIONS[args[0]])
        elif kind == "unfetchable":
            world.unfetchable.add(args[0])
        elif kind == "crash":
            world.crash_controller()
        elif kind == "takeover":
            world.takeover()
        elif kind == "new_cluster":
            world.new_cluster()
        elif kind == "fail_saves":
            world.fail_saves(args[0])
        elif kind == "lose_answers":
            world.lose_answers(args[0])
        elif kind == "tick":
            world.advance(args[0])
    world.unfetchable.clear()


@fuzz_settings(max_examples=300)
# a save that landed unseen (its answer lost, the check read failed): the store fenced the controller for good, and
# the stored state kept an operation its caller was told had failed (an outside review, stop 27; the store's half is
# pinned against a real S3 server in tests/unit/test_state.py, the controller's in tests/unit/test_controller.py)
@example(replicas=2, batch=1, two_slots=True, actions=[("lose_answers", 1), ("roll", "v2"), ("tick", 2)])
# ... and the controller crashed before it saved its own state again: the next one resumed the roll whose caller had
# been told "not started" (found by the fixed seeds once replies were counted: that answer now says the outcome is
# not known, and 'hotswap status' tells)
@example(replicas=1, batch=1, two_slots=False, actions=[("register",), ("lose_answers", 1), ("roll", "v1"),
                                                        ("crash",)])
# schedules that explore runs broke, pinned (each names what it found)
# a canary of the stable version
@example(replicas=2, batch=1, two_slots=False, actions=[("canary", "v1", 10)])
# a failed start apply never retried
@example(replicas=1, batch=1, two_slots=False, actions=[("bad", "v1"), ("register",)])
# claim failed
@example(replicas=1, batch=1, two_slots=False, actions=[("roll", "v1"), ("fail_saves", 1), ("tick", 1), ("takeover",)])
# refill
@example(replicas=5, batch=1, two_slots=False, actions=[("canary", "v2", 34), ("tick", 4), ("bad", "v2"),
                                                        ("register",)])
# 'converged' while still swapping
@example(replicas=1, batch=1, two_slots=False, actions=[("roll", "v2"), ("bad", "v2"), ("register",), ("slow", 1, 3),
                                                        ("tick", 1)])
# a capped crash loop in the simulator left no replica after a new cluster: Serve still owes them (a simulator fix)
@example(replicas=4, batch=1, two_slots=False, actions=[("deadly", "v1"), ("new_cluster",), ("tick", 1), ("tick", 12)])
# a heartbeat overtaken by the ack after it counted a replica still on the new version as reverted (found by
# tests/integration/test_faults.py; pinned with its controls in tests/unit/test_rollout_cases.py)
@example(replicas=3, batch=1, two_slots=True, actions=[("roll", "v2"), ("delay", 0, 2), ("slow", 1, 1), ("tick", 1),
                                                       ("bad", "v2"), ("tick", 2)])
# a replica that joined mid-roll was handed the version at its register, not yet applied, and counted as reverted on
# the report that register carried (found by explore:40 once assignments in flight were modelled; the batch-of-two
# form, from an outside review, is pinned with its control in tests/unit/test_rollout_cases.py)
@example(replicas=1, batch=1, two_slots=False, actions=[("roll", "v2"), ("hold", 0, 1), ("bad", "v2"),
                                                        ("fail_saves", 1), ("register",), ("tick", 1)])
# a replica whose copy and restore both failed (FAILED, serving nothing) was held to the "reverted" invariant as if it
# served its old version (a simulator fix: broken replicas are out of rotation)
@example(replicas=1, batch=1, two_slots=False, actions=[("roll", "v2"), ("unrestorable", "v2"), ("new_cluster",)])
# a target that stalled mid-swap, dropped as gone and counted as a death, came back still swapping while the next one
# moved: it was handed its old version meanwhile and swapped v2 -> v1 -> v2 (found by hand, stop 23; the death it was
# counted as is pinned in tests/unit/test_rollout_cases.py)
@example(replicas=3, batch=1, two_slots=False, actions=[("slow", 0, 4), ("slow", 1, 4), ("slow", 2, 4), ("roll", "v2"),
                                                        ("tick", 2), ("stall", 0, True), ("tick", 9),
                                                        ("stall", 0, False), ("tick", 1)])
# the same after a controller restart: the new controller had handed it nothing yet (an outside review, stop 23)
@example(replicas=3, batch=1, two_slots=False, actions=[("slow", 0, 6), ("slow", 1, 15), ("slow", 2, 4), ("roll", "v2"),
                                                        ("tick", 2), ("stall", 0, True), ("tick", 2), ("crash",),
                                                        ("tick", 9), ("stall", 0, False), ("tick", 1)])
@given(replicas=st.integers(1, 5), batch=st.integers(1, 3), two_slots=st.booleans(),
       actions=st.lists(_action, max_size=40))
def test_drawn_schedules_keep_every_invariant(replicas, batch, two_slots, actions):
    world = World(replicas=replicas, batch_size=batch, two_slots=two_slots)
    play(world, actions)
    world.quiesce()
    # after settling, one more operation must still work end to end (nothing is wedged or fenced for good)
    world.request(OpKind.ROLL, "v4")
    world.quiesce()
    assert world.controller.sm.state.stable == VERSIONS["v4"], world.trace[-40:]
    _STATS["schedules"] += 1
    _STATS["actions"] += len(actions)
    _STATS["ticks"] += world.steps
    _STATS["completed"] += len(world.completed)


def teardown_module(module) -> None:
    path = os.environ.get("HOTSWAP_SIM_STATS")
    if path and _STATS["schedules"]:
        with open(path, "a") as f:
            f.write(json.dumps(_STATS) + "\n")
