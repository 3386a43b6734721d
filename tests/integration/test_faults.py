"""Rollouts under faults, on a real Ray Serve with 3 compiled replicas: a replica killed mid-rollout (actor
killed, process killed) under load, the controller killed at each step boundary of a rollout, a smoke check
failing on one replica, S3 faults (through a fault-injecting proxy in front of the S3 server) during a roll,
the whole app restarted; and the authenticated admin API.

Faults are injected through :mod:`tests.integration.faulty` (marker files make a replica hold before its
swap or fail its smoke check) and :mod:`tests.faultproxy` (the app's ``s3_endpoint_url`` is the proxy).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from benchmarks.load import ClosedLoop
from hotswap.client import HotswapClient
from hotswap.errors import AdapterFetchError, ControllerUnavailableError, RolloutConflictError, RolloutError
from tests.faultproxy import Fault, FaultProxy
from tests.integration.conftest import upload_adapter, upload_versions, wait_for_condition
from tests.integration.faulty import HOLD_SEED, FaultyReplica

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "faults"
BUCKET = "faults"
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def versions(make_adapter, s3_server):
    return upload_versions(BUCKET, {name: make_adapter(f"faults-{name}", **params) for name, params in {
        "v1": dict(r=8, seed=81), "v2": dict(r=16, lora_alpha=4, seed=82),
        "v3": dict(r=4, target_modules=("o_proj",), seed=83), "v4": dict(r=2, lora_alpha=8, seed=84)}.items()})


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The fault-injecting proxy the app reaches S3 through (``s3_endpoint_url``)."""
    proxy = FaultProxy("127.0.0.1", int(s3_server.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def service(serve_cluster, versions, proxy, tiny_base, tmp_path_factory):
    from deployments.app import make_app
    from hotswap.controller import get_controller

    cache = tmp_path_factory.mktemp("faults-cache")
    (cache / "fault-marks").mkdir()
    args = {
        "base_model": str(tiny_base),
        "initial_adapter": versions["v1"][0],
        "cache_dir": str(cache),
        "max_rank": 16,
        "max_batch_size": 2,
        "prefill_chunk_tokens": 8,
        "max_seq_len": 64,
        "device": "cpu",
        "replica_liveness_s": 8,
        "swap_timeout_s": 90,
        "s3_endpoint_url": proxy.url,
        "s3_connect_timeout_s": 1,
        "s3_read_timeout_s": 1,
        "s3_max_attempts": 3,
        "s3_retry_backoff_s": 0.05,
    }
    app = make_app(args, replica_class=FaultyReplica, replica_options={"num_replicas": 3},
                    ingress_options={"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {
                        "env_vars": {"HOTSWAP_ADMIN_TOKEN": TOKEN}}}})
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    client = HotswapClient(APP)
    wait_for_condition(lambda: sum(r["live"] for r in client.status()["replicas"]) == 3, timeout_s=120,
                       message="3 live replicas")
    yield f"{serve_cluster}/{APP}", client, cache / "fault-marks", args
    serve.delete(APP)
    ray.kill(get_controller(APP))


def _live(client) -> dict[str, dict]:
    return {r["id"]: r for r in client.status()["replicas"] if r["live"]}


def _settled(client, count: int = 3) -> dict[str, dict]:
    """The live replicas once no rollout runs and each is idle on its assigned version: a test that counts swaps
    takes its "before" here. A replacement started by an earlier test is live as soon as it registers, before it
    applies its assignment; counted then, its swap to stable showed up as a second swap of the next test's
    (the flake of 2026-12-04: "a survivor swapped twice")."""
    def settled():
        status = client.status()
        live = [r for r in status["replicas"] if r["live"]]
        return status["rollout"] is None and len(live) == count and all(
            r["phase"] == "idle" and r["adapter_sha256"] == r["assigned_sha256"] for r in live)

    wait_for_condition(settled, timeout_s=180, message=f"{count} live replicas, each idle on its assigned version")
    return _live(client)


def _replica_actor(replica_id: str):
    """The Ray actor of a Serve replica, by Serve's own naming (SERVE_REPLICA::app#deployment#id)."""
    return ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{replica_id}", namespace="serve")


def _wait_done(client, count: int):
    wait_for_condition(lambda: (client.status()["rollout"] or {}).get("done", []).__len__() >= count,
                       timeout_s=60, message=f"{count} replicas done")


def test_smoke_check_failure_on_one_replica_rolls_the_others_back(service, versions, reliability):
    _, client, marks, _ = service
    before = _settled(client)
    order = sorted(before)
    (marks / f"fail-{order[1]}").touch()  # the second replica in rolling order fails its smoke check
    try:
        with pytest.raises(RolloutError, match=f"replica {order[1]}.*smoke check failed"):
            client.roll(versions["v3"][0])
    finally:
        (marks / f"fail-{order[1]}").unlink()
    after = _live(client)
    assert {r["adapter_sha256"] for r in after.values()} == {versions["v1"][1]}  # everyone back on v1
    assert after[order[2]]["swaps"] == before[order[2]]["swaps"]  # the third was never touched
    assert after[order[0]]["swaps"] == before[order[0]]["swaps"] + 2  # swapped, then reverted
    status = client.status()
    assert status["stable"]["sha256"] == versions["v1"][1]
    rejected = next(r for r in status["rejected"].values() if r["sha256"] == versions["v3"][1])
    assert "smoke check failed" in rejected["problems"][0]
    assert status["history"][-1]["result"] == "reverted"
    reliability.record("a smoke check failing on one replica mid-rollout", inputs=1,
                       held="the rollout stopped; the replica already moved was reverted, the rest never touched; "
                            "the version recorded as rejected")


def _load(base: str) -> ClosedLoop:
    return ClosedLoop(f"{base}/v1/completions", clients=4, max_seconds=300,
                      body=lambda i, k: {"prompt": f"load {i} {k}", "max_tokens": 4, "temperature": 0})


def _replica_pid(replica_id: str) -> int:
    return ray.get(_replica_actor(replica_id).__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def _kill_process(replica_id: str) -> None:
    os.kill(_replica_pid(replica_id), signal.SIGKILL)


def _process_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("how", ["actor", "process"])
def test_replica_killed_mid_rollout_under_load(service, versions, how, reliability):
    """A replica dies mid-rollout with a request deliberately held in flight on it, under 4 clients: the held
    request is answered anyway (the ingress sends it again to another replica), no other request fails, the
    replacement starts on its assigned version before it serves, and nothing is swapped twice."""
    base, client, marks, _ = service
    before = _settled(client)
    order = sorted(before)
    current = {r["adapter_sha256"] for r in before.values()}
    target = next(v for v in ("v2", "v4") if versions[v][1] not in current)
    held: dict = {}
    with _load(base) as load:
        load.wait_for(8)
        (marks / "hold-request").touch()
        try:
            request = threading.Thread(target=lambda: held.update(r=httpx.post(
                f"{base}/v1/completions", json={"prompt": "held", "max_tokens": 4, "temperature": 0,
                                                "seed": HOLD_SEED}, timeout=120)))
            request.start()
            holding = wait_for_condition(lambda: list(marks.glob("holding-*")), timeout_s=30,
                                         message="a held request")
            victim = holding[0].name.removeprefix("holding-")
            (marks / f"hold-{victim}").touch()  # a swap never waits for requests: make the victim's wait
            rolling = client.actor.roll.remote(versions[target][0])
            # the replicas before the victim move; the victim's swap waits (its mark), holding a request
            _wait_done(client, order.index(victim))
            wait_for_condition(lambda: client.status()["rollout"] is not None, timeout_s=30, message="rollout")
            pid = _replica_pid(victim)
            if how == "actor":
                ray.kill(_replica_actor(victim), no_restart=True)
            else:
                os.kill(pid, signal.SIGKILL)
            # the request stays held until the process is gone: ray.kill returns before it ends, and a release in
            # between let the victim answer the request itself (stop 25's clean-clone CI, once)
            wait_for_condition(lambda: not _process_alive(pid), timeout_s=30,
                               message=f"replica {victim}'s process to end")
            killed_at = time.monotonic()
        finally:
            (marks / "hold-request").unlink()
            (marks / f"holding-{victim}").unlink(missing_ok=True)
            (marks / f"hold-{victim}").unlink(missing_ok=True)
        request.join(timeout=120)
        result = HotswapClient._get(rolling)
        # gone, so not counted as moved (it never reported the version); its replacement starts on the version
        assert victim in result["dropped"] and victim not in result["swapped"]

        def replacement_on_target():
            live = _live(client)
            fresh = [r for r in live.values() if r["id"] not in order]
            return fresh and len(live) >= 3 and all(r["adapter_sha256"] == versions[target][1] for r in live.values())

        wait_for_condition(replacement_on_target, timeout_s=180, message=f"the replacement on {target}")
        fresh_ids = {rid for rid in _live(client) if rid not in order}
        wait_for_condition(lambda: any(s.replica_id in fresh_ids for s in list(load.samples)), timeout_s=60,
                           message="traffic on the replacement")  # once Serve's router knows it
    samples = load.samples
    answer = held["r"]
    assert answer.status_code == 200, answer.text  # the request in flight on the killed replica was answered
    assert answer.headers["x-replica-id"] != victim
    in_flight = [s for s in samples if s.started <= killed_at <= s.finished]
    failed = [s for s in samples if not s.ok]
    assert not failed, failed[:3]
    after = _live(client)
    fresh = [r for r in after.values() if r["id"] not in order]
    assert all(r["swaps"] <= 1 for r in fresh)  # it started on its version: at most the one startup apply
    for rid in order:
        if rid != victim:
            assert after[rid]["swaps"] == before[rid]["swaps"] + 1, rid  # each survivor swapped exactly once
    served_by_fresh = [s for s in samples if s.replica_id in fresh_ids]
    assert served_by_fresh and {s.adapter_sha256 for s in served_by_fresh} == {versions[target][1]}
    reliability.record(f"a replica killed mid-rollout ({how}), one request held in flight on it, 4 clients",
                       requests=len(samples) + 1, failed=len(failed), inputs=1, in_flight=len(in_flight) + 1,
                       held="the held request was answered by another replica (ingress retry); 0 other failures; "
                            "the replacement served only its assigned version; survivors swapped once")


@pytest.mark.parametrize("boundary", [0, 1, 2], ids=["before-any-swap", "after-1-of-3", "after-2-of-3"])
def test_controller_killed_at_each_step_of_a_rollout_resumes_and_converges(service, versions, boundary, reliability):
    """Killed while replica ``boundary`` (in rolling order) waits before its swap: the restarted controller
    reloads its state, finishes the rollout, swaps nobody twice and leaves no replica on an unrecorded version."""
    _, client, marks, _ = service
    before = _settled(client)
    order = sorted(before)
    current = {r["adapter_sha256"] for r in before.values()}
    assert len(current) == 1
    target = next(v for v in ("v4", "v2", "v3", "v1") if versions[v][1] not in current)
    (marks / f"hold-{order[boundary]}").touch()
    rolling = client.actor.roll.remote(versions[target][0])
    try:
        _wait_done(client, boundary)
        wait_for_condition(lambda: (client.status()["rollout"] or {}).get("targets"), timeout_s=60,
                           message="the rollout recorded")
        ray.kill(client.actor, no_restart=False)  # the actor restarts and reloads its state
    finally:
        (marks / f"hold-{order[boundary]}").unlink()
    with pytest.raises(ControllerUnavailableError, match="controller died during the call"):
        HotswapClient._get(rolling)  # the caller of the killed actor sees it die, as one clear error

    def converged():
        status = client.status()
        live = _live(client)
        return status["rollout"] is None and len(live) == 3 and all(
            r["adapter_sha256"] == versions[target][1] for r in live.values())

    wait_for_condition(converged, timeout_s=120, message="the resumed rollout to converge")
    after = _live(client)
    for rid in order:
        assert after[rid]["swaps"] == before[rid]["swaps"] + 1, rid  # each replica swapped exactly once
    status = client.status()
    assert status["stable"]["sha256"] == versions[target][1]
    assert status["history"][-1]["result"] == "ok"
    reliability.record("the controller killed at a rollout step boundary (before any / after 1 / after 2 of 3)",
                       inputs=1, held="restarted, reloaded its state, finished the rollout; every replica "
                                      "swapped exactly once and runs the recorded stable version")


def test_a_second_rollout_is_refused_while_one_runs(service, versions):
    _, client, marks, _ = service
    order = sorted(_live(client))
    target = next(v for v in ("v2", "v3") if {r["adapter_sha256"] for r in _live(client).values()} != {versions[v][1]})
    (marks / f"hold-{order[0]}").touch()  # the first replica waits before its swap: the rollout is running
    first = client.actor.roll.remote(versions[target][0])
    try:
        wait_for_condition(lambda: client.status()["rollout"] is not None, timeout_s=60, message="rollout start")
        with pytest.raises(RolloutConflictError, match=f"rollout is in progress: roll of {versions[target][0]}"):
            client.roll(versions["v1"][0])
        with pytest.raises(RolloutConflictError, match="rollout is in progress"):
            client.rollback()
    finally:
        (marks / f"hold-{order[0]}").unlink()
    HotswapClient._get(first)
    assert {r["adapter_sha256"] for r in _live(client).values()} == {versions[target][1]}


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": TOKEN}, 401),
     ({"authorization": f"Bearer {TOKEN}"}, 200)],
    ids=["missing", "wrong", "not-bearer", "right"],
)
def test_admin_status_needs_the_token(service, headers, status, reliability):
    base = service[0]
    response = httpx.get(f"{base}/admin/status", headers=headers, timeout=30)
    assert response.status_code == status
    if status == 200:
        assert response.json()["stable"]["uri"].startswith("s3://")
    reliability.record("admin API: missing, wrong, non-bearer and right token", requests=1, inputs=1,
                       held="401 for every wrong token, 200 for the right one; without a token configured the "
                            "routes are 404 (test_rollout)")


def test_admin_roll_and_rejection_over_http(service, versions):
    base, client, _, _ = service
    auth = {"authorization": f"Bearer {TOKEN}"}
    ok = httpx.post(f"{base}/admin/roll", json={"uri": versions["v2"][0]}, headers=auth, timeout=120)
    assert ok.status_code == 200, ok.text
    assert {r["adapter_sha256"] for r in _live(client).values()} == {versions["v2"][1]}
    missing = httpx.post(f"{base}/admin/roll", json={"uri": f"s3://{BUCKET}/nope"}, headers=auth, timeout=60)
    assert missing.status_code == 404 and f"s3://{BUCKET}/nope" in missing.json()["error"]["message"]
    bad = httpx.post(f"{base}/admin/roll", json={"uri": 5}, headers=auth, timeout=60)
    assert bad.status_code == 400
    no_canary = httpx.post(f"{base}/admin/promote", headers=auth, timeout=60)
    assert no_canary.status_code == 409 and "no canary" in no_canary.json()["error"]["message"]
    assert httpx.post(f"{base}/admin/roll", json={"uri": versions["v2"][0]}, timeout=60).status_code == 401


def _new_version(make_adapter, name: str, seed: int) -> tuple[str, str]:
    """A version never fetched before, uploaded straight to S3 (not through the proxy)."""
    return upload_adapter(make_adapter(f"faults-{name}", r=8, lora_alpha=4 + seed % 13, seed=seed), BUCKET, name)


def _snapshot(client) -> tuple:
    status = client.status()
    return status["stable"], status["canary"], {rid: (r["adapter_sha256"], r["swaps"])
                                                for rid, r in _live(client).items()}


@pytest.mark.parametrize(
    ("kind", "after"), [("stall", 700), ("truncate", 700), ("flip", 3000), ("status500", 0)],
    ids=["stalled-body", "truncated-body", "flipped-byte", "server-error"],
)
def test_s3_fault_during_a_roll_is_retried_and_the_roll_succeeds(service, proxy, make_adapter, kind, after,
                                                                 reliability):
    _, client, _, _ = service
    name = f"s3-{kind}"
    uri, sha = _new_version(make_adapter, name, seed=200 + len(kind))
    injected = proxy.injected
    proxy.add(Fault(kind, match=f"GET /{BUCKET}/{name}/adapter_model.safetensors".encode(), after=after, times=2))
    result = client.roll(uri)
    assert proxy.injected - injected == 2  # two damaged attempts, the third (the last allowed) succeeded
    assert len(result["swapped"]) == 3 and {r["adapter_sha256"] for r in _live(client).values()} == {sha}
    reliability.record("S3 fault during a roll, transient (stall, truncated body, flipped byte, 5xx)", inputs=1,
                       held="retried within s3_max_attempts=3; the roll succeeded; the damaged bytes never "
                            "reached a replica")


def test_s3_persistent_fault_or_s3_down_fails_clearly_touches_nothing_then_recovers(service, proxy, make_adapter,
                                                                                     reliability):
    _, client, _, _ = service
    uri, sha = _new_version(make_adapter, "s3-persistent", seed=300)
    before = _snapshot(client)
    fault = Fault("truncate", match=f"GET /{BUCKET}/s3-persistent/adapter_model.safetensors".encode(), after=700,
                  times=99)
    proxy.add(fault)
    try:
        with pytest.raises(AdapterFetchError, match="failed 3 times") as info:
            client.roll(uri)
        assert uri in str(info.value)
        assert _snapshot(client) == before
    finally:
        fault.times = 0
    proxy.down = True
    try:
        refused = proxy.refused
        with pytest.raises(AdapterFetchError) as info:
            client.roll(uri)
        assert uri in str(info.value) and proxy.refused - refused >= 3
        assert _snapshot(client) == before
    finally:
        proxy.down = False
    result = client.roll(uri)  # S3 is back: the same version now rolls
    assert len(result["swapped"]) == 3 and {r["adapter_sha256"] for r in _live(client).values()} == {sha}
    reliability.record("S3 persistently damaged, then down, then back", inputs=3,
                       held="bounded retries, then an AdapterFetchError naming the URI; no replica touched and "
                            "stable/canary unchanged; the same roll succeeded once S3 was back")


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_event(service, reliability):
    """After a stream's first item the ingress has sent 200 and cannot send the request elsewhere: when the replica
    dies then, the client reads an error event that says so, then ``[DONE]`` (before, the body just stopped)."""
    base, client, marks, _ = service
    count = len(_live(client))
    (marks / "hold-request").touch()  # the request joins a row and sits out every step: no text after its head
    try:
        body = {"prompt": "a stream cut short", "max_tokens": 8, "temperature": 0, "seed": HOLD_SEED, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            victim = response.headers["x-replica-id"]
            wait_for_condition(lambda: (marks / f"holding-{victim}").exists(), timeout_s=30,
                               message="the stream held on its replica")
            _kill_process(victim)
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    finally:
        (marks / "hold-request").unlink()
        for mark in marks.glob("holding-*"):
            mark.unlink(missing_ok=True)
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert "went away" in error["message"] and "incomplete" in error["message"], error
    assert error["type"] == "server_error"
    assert all("error" not in json.loads(e) for e in events[:-2])
    wait_for_condition(lambda: len(_live(client)) >= count and victim not in _live(client), timeout_s=180,
                       message="the replacement of the killed replica")
    reliability.record("a replica killed mid-stream (after the first item)", requests=1, failed=1, inputs=1,
                       in_flight=1, held="the stream (the one request, cut short) ended with an error event naming "
                                         "the lost replica, then [DONE]; the replacement started")


def test_a_killed_canary_replica_is_replaced_and_the_split_kept(service, versions, reliability):
    """The canary's only replica dies: the split comes back by itself (the controller moves a live stable replica,
    a survivor or the replacement, to the canary), traffic shows both versions again, and rollback still works.
    Control: without the refill (before this test existed) ``canary_replicas`` kept naming the dead replica and
    every answer came from stable, so the first wait below timed out."""
    base, client, _, _ = service
    stable = client.status()["stable"]["sha256"]
    target = next(v for v in ("v2", "v4") if versions[v][1] != stable)
    before = _settled(client)
    client.roll(versions[target][0], canary=34)
    victim = client.status()["canary_replicas"]
    assert len(victim) == 1 and before[victim[0]]["live"]
    victim = victim[0]
    ray.kill(_replica_actor(victim), no_restart=True)

    def split_restored():
        status = client.status()
        live = {r["id"]: r for r in status["replicas"] if r["live"]}
        on = [r["adapter_sha256"] for r in live.values()]
        return (status["rollout"] is None and len(live) == 3 and on.count(versions[target][1]) == 1
                and on.count(stable) == 2 and status["canary_replicas"] != [victim]
                and all(r in live and live[r]["adapter_sha256"] == versions[target][1]
                        for r in status["canary_replicas"]))

    wait_for_condition(split_restored, timeout_s=180, message="the canary's share restored")
    status = client.status()
    assert status["canary"]["sha256"] == versions[target][1] and status["stable"]["sha256"] == stable
    (holder,) = status["canary_replicas"]
    how = f"{'a survivor' if holder in before else 'the replacement'} moved to the canary"
    after = _live(client)
    for rid, r in after.items():
        if rid in before:  # a survivor swapped at most once more (the one moved to the canary)
            assert r["swaps"] == before[rid]["swaps"] + (rid == holder), rid
    seen, sent = set(), 0
    while len(seen) < 2 and sent < 60:  # a third of the traffic goes to the canary; 60 misses: p < 1e-10
        answer = httpx.post(f"{base}/v1/completions", json={"prompt": f"split {sent}", "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200, answer.text
        seen.add(answer.headers["x-adapter-sha256"])
        sent += 1
    assert seen == {stable, versions[target][1]}
    client.rollback()
    assert {r["adapter_sha256"] for r in _live(client).values()} == {stable}
    assert client.status()["canary"] is None
    reliability.record("the canary's only replica killed", requests=sent, failed=0, inputs=1,
                       held=f"the 1-of-3 split came back by itself ({how}); both versions answered again; "
                            "survivors swapped at most once; rollback returned every replica to stable")


def test_whole_app_restart_comes_back_on_the_last_stable_version(service, versions, reliability):
    """After serve stops and starts again, the state file wins over initial_adapter in the config."""
    from deployments.app import make_app
    from hotswap.controller import get_controller

    _, client, _, args = service
    stable = client.status()["stable"]
    assert stable["uri"] != args["initial_adapter"]  # earlier tests moved stable away from v1
    serve.delete(APP)
    ray.kill(get_controller(APP))  # the whole app is gone, controller included
    serve.run(make_app(args, replica_class=FaultyReplica, replica_options={"num_replicas": 1}), name=APP,
              route_prefix=f"/{APP}")
    restarted = HotswapClient(APP)
    wait_for_condition(lambda: len(_live(restarted)) == 1, timeout_s=120, message="the restarted replica")
    assert restarted.status()["stable"] == stable
    assert [r["adapter_sha256"] for r in _live(restarted).values()] == [stable["sha256"]]
    reliability.record("the whole app stopped and started again", inputs=1,
                       held="the replica came back on the last stable version from the state store, not on "
                            "initial_adapter")
