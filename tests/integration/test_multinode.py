"""hotswap on a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a second raylet with its own object
store on this machine), the model replicas on the second node through a custom resource.

The scenario runs in a child process (``python -m tests.multinode``, its docstring lists the steps) because this
process is already connected to the session's one-node Ray (``serve_cluster``) and a process can only be
connected to one cluster; the child writes what it saw as JSON and the tests below check it, one claim each.
Nothing here uses the session's Ray, so the module runs in any order with the rest of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Run the two-node scenario once; its JSON record, with ``stdout``/``stderr`` tails for failure messages."""
    out = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-m", "tests.multinode", "--json", str(out / "run.json"),
                           "--workdir", str(out / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=720)
    path = out / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {"steps": {}, "error": f"exit {proc.returncode}"}
    record["log"] = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return record


def _step(run: dict, name: str) -> dict:
    if name not in run["steps"]:
        pytest.fail(f"the scenario stopped before step {name!r}: {run['error']}\n{run['log']}")
    return run["steps"][name]


def _sha(run: dict, version: str) -> str:
    return run["versions"][version]["sha256"]


def _check(run: dict, name: str, *, node: str, running: dict[str, int]) -> dict:
    """Both replicas on ``node``, running versions as counted in ``running``; the completions came from them,
    each with the adapter its replica reports, and every version running answered."""
    step = _step(run, name)
    replicas = step["replicas"]
    assert {r["node"] for r in replicas.values()} == {run["nodes"][node]}, (name, replicas)
    assert Counter(r["sha256"] for r in replicas.values()) == Counter(
        {_sha(run, v): n for v, n in running.items()}), (name, replicas)
    for answer in step["answers"]:
        assert answer["status"] == 200, (name, answer)
        assert answer["replica"] in replicas and answer["sha256"] == replicas[answer["replica"]]["sha256"], (
            name, answer)
    assert {a["sha256"] for a in step["answers"]} == {_sha(run, v) for v in running}, (name, step["answers"])
    assert step["controller_node"] != run["nodes"][node] or node == "A", (
        f"{name}: the controller shares node {node} with the replicas, so no tensor crossed nodes")
    return step


def test_replicas_on_the_second_node_start_on_the_initial_adapter(run):
    step = _check(run, "start", node="A", running={"v1": 2})
    assert step["stable"] == _sha(run, "v1")


def test_roll_canary_and_promote_reach_the_second_node(run):
    roll = _check(run, "roll", node="A", running={"v2": 2})
    assert roll["swapped"] == sorted(roll["replicas"])
    canary = _check(run, "canary", node="A", running={"v2": 1, "v3": 1})  # 50% of 2 replicas: one
    assert len(canary["swapped"]) == 1 and canary["canary_replicas"] == canary["swapped"]
    assert (canary["stable"], canary["canary"]) == (_sha(run, "v2"), _sha(run, "v3"))
    promote = _check(run, "promote", node="A", running={"v3": 2})
    assert (promote["stable"], promote["canary"]) == (_sha(run, "v3"), None)


def test_losing_the_second_node_moves_the_controller_and_new_replicas_run_the_stable_version(run):
    """Node A (its raylet, the replicas, the controller if it was there) is killed; the controller answers again
    from the head with its state read back from S3; the replicas Serve starts on the new node B run v3."""
    step = _check(run, "node_lost", node="B", running={"v3": 2})
    nodes = {node_id: name for name, node_id in run["nodes"].items()}
    assert step["controller_node_after_loss"] == run["nodes"]["head"], (
        f"the controller answered from node {nodes.get(step['controller_node_after_loss'])} after node A died; "
        f"it ran on {nodes.get(_step(run, 'promote')['controller_node'])} before")
    assert not set(step["replicas"]) & set(step["replicas_before"])
    assert (step["stable"], step["canary"]) == (_sha(run, "v3"), None)


def test_node_b_cannot_reach_s3_and_the_head_can(run):
    """The control for the next test: a read of the state object fails from node B and succeeds from the head."""
    probe = run.get("s3_probe") or pytest.fail(f"no S3 probe recorded: {run['error']}\n{run['log']}")
    assert probe["head"] == "ok"
    assert probe["B"] != "ok"


def test_replicas_without_s3_roll_canary_and_roll_back_from_the_object_store(run):
    """Node B cannot reach S3 and the controller is on the head, so every version B's replicas run came through
    the object store from the other node."""
    roll = _check(run, "roll_no_s3", node="B", running={"v4": 2})
    assert roll["swapped"] == sorted(roll["replicas"])
    canary = _check(run, "canary_no_s3", node="B", running={"v4": 1, "v1": 1})
    assert (canary["stable"], canary["canary"]) == (_sha(run, "v4"), _sha(run, "v1"))
    rollback = _check(run, "rollback_no_s3", node="B", running={"v4": 2})
    assert rollback["swapped"] == canary["canary_replicas"] and rollback["canary"] is None


def test_killed_replicas_on_the_second_node_are_replaced_on_the_assigned_version(run):
    step = _check(run, "replicas_killed", node="B", running={"v4": 2})
    assert not set(step["replicas"]) & set(step["replicas_before"])


def test_the_state_lives_in_s3(run):
    _step(run, "replicas_killed")
    assert "s3://" in json.dumps(_step(run, "start")["state_store"])
    assert _sha(run, "v4") in run["state_object"]
    assert run["error"] is None, f"{run['error']}\n{run['log']}"
