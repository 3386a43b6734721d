"""Rollouts under faults, on a real Ray Serve with 3 compiled replicas: a replica killed mid-rollout, the
controller killed mid-rollout, a smoke check failing on one replica; and the authenticated admin API.

Faults are injected through a replica subclass: a marker file ``hold-<replica id>`` makes that replica wait
before swapping (so a test can act "mid-rollout"), ``fail-<replica id>`` makes its smoke check fail.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from deployments.replica import ModelReplica
from hotswap.client import HotswapClient
from hotswap.errors import RolloutConflictError, RolloutError
from tests.integration.conftest import wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "faults"
BUCKET = "faults"
TOKEN = "s3cret-admin-token"


class _FaultyReplica(ModelReplica.func_or_class):
    def _swap_and_check(self, staged):
        marks = Path(self.settings.cache_dir) / "fault-marks"
        hold = marks / f"hold-{self.replica_id}"
        for _ in range(1200):  # at most 60 s
            if not hold.exists():
                break
            import time

            time.sleep(0.05)
        return super()._swap_and_check(staged)

    def _smoke_check(self):
        if (Path(self.settings.cache_dir) / "fault-marks" / f"fail-{self.replica_id}").exists():
            raise RuntimeError("injected smoke-check failure")
        super()._smoke_check()


FaultyReplica = serve.deployment(_FaultyReplica, name="ModelReplica", ray_actor_options={"num_cpus": 0.3},
                                 health_check_period_s=2, health_check_timeout_s=60)


@pytest.fixture(scope="module")
def versions(make_adapter, s3_server):
    from hotswap.store import make_s3_client

    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    client.create_bucket(Bucket=BUCKET)
    out = {}
    for name, params in {"v1": dict(r=8, seed=81), "v2": dict(r=16, lora_alpha=4, seed=82),
                         "v3": dict(r=4, target_modules=("o_proj",), seed=83),
                         "v4": dict(r=2, lora_alpha=8, seed=84)}.items():
        folder = make_adapter(f"faults-{name}", **params)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            client.upload_file(str(folder / f), BUCKET, f"{name}/{f}")
        out[name] = (f"s3://{BUCKET}/{name}",
                     hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def service(serve_cluster, versions, tiny_base, tmp_path_factory):
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


def _replica_actor(replica_id: str):
    """The Ray actor of a Serve replica, by Serve's own naming (SERVE_REPLICA::app#deployment#id)."""
    return ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{replica_id}", namespace="serve")


def _wait_done(client, count: int):
    wait_for_condition(lambda: (client.status()["rollout"] or {}).get("done", []).__len__() >= count,
                       timeout_s=60, message=f"{count} replicas done")


def test_smoke_check_failure_on_one_replica_rolls_the_others_back(service, versions):
    _, client, marks, _ = service
    before = _live(client)
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
    assert "smoke check failed" in status["rejected"][versions["v3"][1]]["problems"][0]
    assert status["history"][-1]["result"] == "reverted"


def test_replica_killed_mid_rollout_comes_back_on_its_assigned_version(service, versions):
    base, client, marks, _ = service
    order = sorted(_live(client))
    victim = order[1]
    (marks / f"hold-{victim}").touch()
    rolling = client.actor.roll.remote(versions["v2"][0])
    try:
        _wait_done(client, 1)  # the first replica moved; the second is held before its swap
        ray.kill(_replica_actor(victim), no_restart=True)
    finally:
        (marks / f"hold-{victim}").unlink()
    result = HotswapClient._get(rolling)
    assert victim in result["swapped"]  # counted as gone; its replacement starts on the assigned version
    def replacement_on_v2():
        live = _live(client)
        fresh = [r for r in live.values() if r["id"] not in order]
        return fresh and all(r["adapter_sha256"] == versions["v2"][1] for r in fresh) and len(live) >= 3

    wait_for_condition(replacement_on_v2, timeout_s=180, message="the replacement on v2")
    assert {r["adapter_sha256"] for r in _live(client).values()} == {versions["v2"][1]}
    for _ in range(6):  # and it serves v2 from the first request
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
        assert r.status_code == 200 and r.headers["x-adapter-sha256"] == versions["v2"][1]


def test_controller_killed_mid_rollout_resumes_without_swapping_twice(service, versions):
    _, client, marks, _ = service
    before = _live(client)
    order = sorted(before)
    (marks / f"hold-{order[1]}").touch()
    rolling = client.actor.roll.remote(versions["v4"][0])
    try:
        _wait_done(client, 1)
        ray.kill(client.actor, no_restart=False)  # the actor restarts and reloads its state
    finally:
        (marks / f"hold-{order[1]}").unlink()
    with pytest.raises(Exception):  # noqa: B017 - the caller of the killed actor sees it die
        HotswapClient._get(rolling)

    def converged():
        status = client.status()
        live = _live(client)
        return status["rollout"] is None and len(live) == 3 and all(
            r["adapter_sha256"] == versions["v4"][1] for r in live.values())

    wait_for_condition(converged, timeout_s=120, message="the resumed rollout to converge")
    after = _live(client)
    for rid in order:
        assert after[rid]["swaps"] == before[rid]["swaps"] + 1, rid  # each replica swapped exactly once
    assert client.status()["stable"]["sha256"] == versions["v4"][1]


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
def test_admin_status_needs_the_token(service, headers, status):
    base = service[0]
    response = httpx.get(f"{base}/admin/status", headers=headers, timeout=30)
    assert response.status_code == status
    if status == 200:
        assert response.json()["stable"]["uri"].startswith("s3://")


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


def test_whole_app_restart_comes_back_on_the_last_stable_version(service, versions):
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
