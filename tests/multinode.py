"""A real two-node Ray cluster on this machine running hotswap past one node; ``tests/integration/test_multinode.py``
runs it and checks what it records.

    python -m tests.multinode --json multinode.json

It runs in a process of its own because a process is connected to one Ray cluster at a time and the test
session already holds one (``serve_cluster`` in ``tests/integration/conftest.py``). It starts an S3 server on
127.0.0.1, a head node (the Serve controller and proxy, the ingress, the hotswap controller) and a worker node
that alone has the ``hotswap_model`` resource, so both model replicas run there; the controller's state lives
in S3 (``state_uri``). Then, recording what happened at each step:

1. ``start``: the replicas register and serve the initial adapter.
2. ``roll``: every replica moves to a new version; ``canary``: a 50% canary, then ``promote``.
3. ``node_lost``: the worker node is killed (its raylet and every process on it) and, once the controller
   answers again from the head node, a new worker node joins. That node's workers cannot reach S3 (their
   ``AWS_ENDPOINT_URL_S3`` is a closed port; ``s3_probe`` records a read that fails there and succeeds on the
   head as the control), so whatever version its replicas run came through the object store from the head.
4. ``roll_no_s3``: a roll, a canary and a rollback on the new node's replicas.
5. ``replicas_killed``: both replica actors killed; Serve's replacements start on the assigned version.

Each step records the controller's and the replicas' nodes, ``hotswap status`` and which replica answered which
completion with which adapter; the script asserts nothing itself, so the test can say what differed. A step
that waits too long raises, and the script exits 1 with the JSON written so far.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Literal

APP = "multinode"
BUCKET = "multinode"
STATE_KEY = "hotswap/state.json"
MODEL_RESOURCE = "hotswap_model"
HEAD_RESOURCE = "hotswap_head"
NODE_B_RESOURCE = "hotswap_node_b"  # the S3 probe's way onto node B, whose hotswap_model the replicas use up
VERSIONS = {
    "v1": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=91),
    "v2": dict(r=16, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=92),
    "v3": dict(r=4, lora_alpha=32, target_modules=("o_proj",), seed=93),
    "v4": dict(r=12, lora_alpha=6, target_modules=("gate_proj", "down_proj"), seed=94),
}
WAIT_S = 300  # a replica loads and warms up before it registers: tens of seconds on 2 busy cores (a timeout)


def _say(message: str) -> None:
    print(message, flush=True)


def _wait(predicate, *, what: str, timeout_s: float = WAIT_S):
    from tests.integration.conftest import wait_for_condition

    return wait_for_condition(predicate, timeout_s=timeout_s, interval_s=0.5, message=what)


class Scenario:
    """The cluster, the app and the observations; one method per step."""

    def __init__(self, workdir: Path, record: dict) -> None:
        self.workdir = workdir
        self.record = record
        self.cluster = None
        self.base = None
        self.client = None
        self.versions: dict[str, tuple[str, str]] = {}

    # --- setup ---------------------------------------------------------------------------------------

    def start(self, s3_endpoint: str) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from deployments.app import SERVE_CONTROLLER_OPTIONS, make_app
        from hotswap.builtin import materialize_builtin_model, write_random_adapter
        from hotswap.client import HotswapClient
        from tests.conftest import free_port
        from tests.integration.conftest import upload_versions

        cache = self.workdir / "cache"
        base_dir = materialize_builtin_model("tiny-llama", cache_dir=cache)
        folders = {name: write_random_adapter(base_dir, self.workdir / "adapters" / name, **params)
                   for name, params in VERSIONS.items()}
        self.versions = upload_versions(BUCKET, folders)
        self.record["versions"] = {name: {"uri": uri, "sha256": sha} for name, (uri, sha) in self.versions.items()}

        # Every Ray process inherits this process's environment (the raylets are its children): the head's
        # workers reach S3 at s3_endpoint and find the model in the cache; no job-wide runtime_env, so a node
        # can be given a different environment (env_vars) in add_node.
        os.environ.update(HOTSWAP_CACHE_DIR=str(cache), TOKENIZERS_PARALLELISM="false")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {HEAD_RESOURCE: 1}, "include_dashboard": False})
        ray.init(address=self.cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        self.node_a = self.cluster.add_node(num_cpus=2, resources={MODEL_RESOURCE: 2})
        self.record["nodes"] = {"head": self.cluster.head_node.node_id, "A": self.node_a.node_id}

        port = free_port()
        # one proxy, on the head: both nodes are this machine, so a proxy per node would collide on the port
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port},
                    controller_options=SERVE_CONTROLLER_OPTIONS)
        self.base = f"http://127.0.0.1:{port}"
        args = {
            "base_model": "builtin:tiny-llama",
            "initial_adapter": self.versions["v1"][0],
            "cache_dir": str(cache),
            "state_uri": f"s3://{BUCKET}/{STATE_KEY}",
            "max_rank": 16,
            "max_batch_size": 2,
            "prefill_chunk_tokens": 8,
            "max_seq_len": 64,
            "device": "cpu",
            # eager replicas: the scenario is about nodes (placement, node loss, the object store as the only way
            # to a version); compiled swaps are covered on one node (tests/integration/test_rollout.py and others).
            # Compiled, the test's setup took 211 s in a full CI run; eager, the whole test file 137 s alone
            "compile": False,
            "replica_liveness_s": 10,
            "s3_connect_timeout_s": 2,
            "s3_read_timeout_s": 5,
            "s3_max_attempts": 2,
        }
        self.record["app_args"] = args
        app = make_app(
            args,
            replica_options={"num_replicas": 2,
                             "ray_actor_options": {"num_cpus": 0.5, "resources": {MODEL_RESOURCE: 1}}},
            ingress_options={"ray_actor_options": {"num_cpus": 0.1, "resources": {HEAD_RESOURCE: 0.1}}},
        )
        t0 = time.monotonic()
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        self.client = _wait(lambda: HotswapClient(APP), what="the hotswap controller")
        self._wait_replicas(2, what="2 live replicas on node A")
        self.step("start", seconds=time.monotonic() - t0)

    # --- observations --------------------------------------------------------------------------------

    def node_of(self, actor) -> str:
        import ray

        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=120)

    def replica_actor(self, replica_id: str):
        import ray

        return ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{replica_id}", namespace="serve")

    def live(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.client.status()["replicas"] if r["live"]}

    def _wait_replicas(self, count: int, *, what: str, exclude=(), sha: str | None = None) -> dict[str, dict]:
        """Wait for ``count`` live replicas (none of ``exclude``), no rollout, each running what the controller
        assigned it (a replica that has registered reports the base model until it has applied its assignment)
        and ``sha`` if given."""

        def ready():
            status = self.client.status()
            live = {r["id"]: r for r in status["replicas"] if r["live"] and r["id"] not in exclude}
            ok = len(live) == count and status["rollout"] is None and all(
                r["adapter_sha256"] == r.get("assigned_sha256", r["adapter_sha256"]) for r in live.values()) and (
                sha is None or all(r["adapter_sha256"] == sha for r in live.values()))
            return live if ok else None

        return _wait(ready, what=what)

    def answers(self, n: int = 8) -> list[dict]:
        import httpx

        out = []
        for i in range(n):
            r = httpx.post(f"{self.base}/v1/completions", timeout=60,
                           json={"prompt": f"node {i}", "max_tokens": 2, "temperature": 0})
            out.append({"status": r.status_code, "replica": r.headers.get("x-replica-id"),
                        "uri": r.headers.get("x-adapter-uri"), "sha256": r.headers.get("x-adapter-sha256")})
        return out

    def step(self, name: str, *, answers: int = 8, **extra) -> dict:
        """Record the controller's node, each live replica (node, version, swaps) and ``answers`` completions."""
        status = self.client.status()
        replicas = {}
        for rid, r in self.live().items():
            replicas[rid] = {"node": self.node_of(self.replica_actor(rid)), "sha256": r["adapter_sha256"],
                             "uri": r["adapter_uri"], "swaps": r["swaps"], "pid": r["pid"]}
        entry = {"controller_node": self.node_of(self.client.actor), "replicas": replicas,
                 "stable": (status["stable"] or {}).get("sha256"),
                 "canary": (status["canary"] or {}).get("sha256"), "canary_replicas": status["canary_replicas"],
                 "state_store": status.get("state_store"), "answers": self.answers(answers), **extra}
        self.record["steps"][name] = entry
        names = {v: k for k, v in self.record["nodes"].items()}
        names.update({sha: name for name, (_, sha) in self.versions.items()})
        served = "+".join(sorted({names.get(a["sha256"], "?") for a in entry["answers"] if a["status"] == 200}))
        ok = sum(a["status"] == 200 for a in entry["answers"])
        took = f" after {extra['seconds']:.0f} s" if "seconds" in extra else ""
        _say(f"[{name}] stable {names.get(entry['stable'], '?')}, canary {names.get(entry['canary'], 'none')}; "
             f"controller on {names.get(entry['controller_node'], '?')}; replicas{took}: "
             + ", ".join(f"{rid} on {names.get(r['node'], '?')} ({names.get(r['sha256'], '?')})"
                         for rid, r in sorted(replicas.items()))
             + f"; {ok} of {len(entry['answers'])} completions answered, with {served}")
        return entry

    def s3_probe(self, resource: str) -> str:
        """Read the state object from a task on the node that has ``resource``: 'ok' or the error."""
        import ray

        @ray.remote(num_cpus=0, resources={resource: 0.01}, max_retries=0)
        def probe() -> str:
            from hotswap.store import make_s3_client

            try:
                make_s3_client(connect_timeout_s=1, read_timeout_s=1).head_object(Bucket=BUCKET, Key=STATE_KEY)
                return "ok"
            except Exception as e:  # the answer is the error
                return f"{type(e).__name__}: {e}"

        return ray.get(probe.remote(), timeout=WAIT_S)  # a new worker process: slow to start on busy cores

    # --- steps ---------------------------------------------------------------------------------------

    def rollouts(self, *, roll: str, canary: str, end: Literal["promote", "rollback"], suffix: str = "") -> None:
        """Steps ``roll``, ``canary`` and ``end`` (+ ``suffix``): every replica to version ``roll``, a 50% canary
        of version ``canary``, then ``end``; each waits for the replicas to settle before it is recorded."""
        events = {"on_event": lambda line: _say(f"  {line}")}
        sha = {"roll": self.versions[roll][1], "canary": None,
               end: self.versions[canary if end == "promote" else roll][1]}
        calls = {"roll": lambda: self.client.roll(self.versions[roll][0], **events),
                 "canary": lambda: self.client.roll(self.versions[canary][0], canary=50, **events),
                 end: lambda: getattr(self.client, end)(**events)}
        for name, call in calls.items():
            result = call()
            self._wait_replicas(2, what=f"the replicas settled after {name}", sha=sha[name])
            self.step(name + suffix, answers=24 if name == "canary" else 8, swapped=sorted(result["swapped"]))

    def lose_node(self) -> None:
        """Kill node A outright; the controller comes back on the head; a new node B (no S3) gets the replicas."""
        import ray

        from hotswap.client import HotswapClient

        before = set(self.live())
        t0 = time.monotonic()
        self.cluster.remove_node(self.node_a, allow_graceful=False)
        # remove_node kills the raylet and its helpers; its workers (the controller, if it ran there) exit only
        # when they notice, so a call can still reach them: wait until the cluster itself has marked A dead
        _wait(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == self.node_a.node_id),
              what="the cluster marking node A dead")
        self.client = _wait(lambda: HotswapClient(APP) if HotswapClient(APP).status().get("ready", True) else None,
                            what="the controller answering after node A died")
        controller_after_loss = self.node_of(self.client.actor)
        blocked = f"http://127.0.0.1:{_closed_port()}"
        node_b = self.cluster.add_node(num_cpus=2, resources={MODEL_RESOURCE: 2, NODE_B_RESOURCE: 1},
                                       env_vars={"AWS_ENDPOINT_URL_S3": blocked})
        self.record["nodes"]["B"] = node_b.node_id
        self._wait_replicas(2, what="2 new live replicas on node B", exclude=before)
        seconds = time.monotonic() - t0
        self.record["s3_probe"] = {"B": self.s3_probe(NODE_B_RESOURCE), "head": self.s3_probe(HEAD_RESOURCE)}
        _say(f"[node B] reading the state object from S3: on node B {self.record['s3_probe']['B'].split(':')[0]}, "
             f"on the head {self.record['s3_probe']['head']}")
        self.step("node_lost", seconds=seconds, replicas_before=sorted(before),
                  controller_node_after_loss=controller_after_loss)

    def kill_replicas(self) -> None:
        import ray

        before = set(self.live())
        t0 = time.monotonic()
        for rid in before:
            ray.kill(self.replica_actor(rid), no_restart=True)
        self._wait_replicas(2, what="2 replacement replicas", exclude=before)
        self.step("replicas_killed", seconds=time.monotonic() - t0, replicas_before=sorted(before))

    def read_state(self) -> None:
        from hotswap.store import make_s3_client

        body = make_s3_client(connect_timeout_s=2, read_timeout_s=2).get_object(Bucket=BUCKET, Key=STATE_KEY)
        self.record["state_object"] = body["Body"].read().decode()

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    from tests.conftest import free_port

    return free_port()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the observations")
    parser.add_argument("--workdir", help="cache and adapters (default: a new temporary directory)")
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="hotswap-multinode-"))
    record: dict = {"steps": {}, "error": None}
    from benchmarks._cluster import local_s3

    t0 = time.monotonic()
    scenario = Scenario(workdir, record)
    try:
        with local_s3() as endpoint:
            try:
                scenario.start(endpoint)
                scenario.rollouts(roll="v2", canary="v3", end="promote")
                scenario.lose_node()
                scenario.rollouts(roll="v4", canary="v1", end="rollback", suffix="_no_s3")
                scenario.kill_replicas()
                scenario.read_state()
            finally:
                scenario.shutdown()
    except Exception as e:  # recorded for the test, which reports it
        record["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        print(record["error"], file=sys.stderr)
    record["seconds"] = time.monotonic() - t0
    Path(opts.json).write_text(json.dumps(record, indent=2))
    _say(f"done in {record['seconds']:.0f} s" + (" (failed)" if record["error"] else ""))
    return 1 if record["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
