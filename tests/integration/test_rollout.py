"""Rollouts through the controller on a real Ray Serve with 3 compiled replicas and adapters on a real
S3 server on 127.0.0.1: roll, canary, promote, both rollbacks, rejection, conflicts, no recompiles."""

from __future__ import annotations

import os

import httpx
import pytest
import ray

from hotswap.client import HotswapClient
from hotswap.errors import AdapterNotFoundError, AdapterValidationError, RolloutConflictError
from tests.integration.conftest import upload_versions, wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "rollout"
BUCKET = "rollout"
VERSIONS = {  # different ranks (<= max_rank 16), alphas and target subsets
    "v1": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=71),
    "v2": dict(r=16, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"), seed=72),
    "v3": dict(r=4, lora_alpha=32, target_modules=("o_proj",), seed=73),
    "v4": dict(r=12, lora_alpha=6, target_modules=("gate_proj", "down_proj"), seed=74, use_rslora=True),
}


@pytest.fixture(scope="module")
def versions(make_adapter, s3_server):
    """Upload every version to S3; return name -> (uri, sha256)."""
    from hotswap.store import make_s3_client

    out = upload_versions(BUCKET, {name: make_adapter(f"rollout-{name}", **params)
                                   for name, params in VERSIONS.items()})
    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    bad = make_adapter("rollout-bad-src", r=8, seed=79)
    import json

    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(use_dora=True, rank_pattern={"q_proj": 2})
    client.put_object(Bucket=BUCKET, Key="bad/adapter_config.json", Body=json.dumps(config).encode())
    client.upload_file(str(bad / "adapter_model.safetensors"), BUCKET, "bad/adapter_model.safetensors")
    out["bad"] = (f"s3://{BUCKET}/bad", None)
    return out


@pytest.fixture(scope="module")
def service(serve_cluster, versions, tiny_base, base_settings, tmp_path_factory):
    """3 replicas starting on v1; yields (base URL, client)."""
    from ray import serve

    from deployments.app import make_app
    from hotswap.controller import get_controller

    args = {
        "base_model": str(tiny_base),
        "initial_adapter": versions["v1"][0],
        "cache_dir": str(base_settings.cache_dir),
        "state_uri": str(tmp_path_factory.mktemp("rollout-state") / "state.json"),
        "max_rank": 16,
        "max_batch_size": 2,
        "prefill_chunk_tokens": 8,
        "max_seq_len": 64,
        "device": "cpu",
    }
    serve.run(make_app(args, replica_options={"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.3}}),
              name=APP, route_prefix=f"/{APP}")
    client = HotswapClient(APP)
    wait_for_condition(lambda: sum(r["live"] for r in client.status()["replicas"]) == 3, timeout_s=120,
                       message="3 live replicas")
    yield f"{serve_cluster}/{APP}", client
    serve.delete(APP)
    ray.kill(get_controller(APP))


def _running(client) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["adapter_uri"], r["adapter_sha256"]) for r in client.status()["replicas"] if r["live"]}


def _served_versions(base, n=24) -> set[str]:
    seen = set()
    for i in range(n):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": f"hi {i}", "max_tokens": 2, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-adapter-sha256"])
    return seen


def _settle(client, expected: dict[str, int]):
    """Wait until heartbeats report the expected count of replicas per sha256."""

    def check():
        counts: dict[str, int] = {}
        for _, sha in _running(client).values():
            counts[sha] = counts.get(sha, 0) + 1
        return counts == expected

    wait_for_condition(check, timeout_s=30, message=f"replicas {expected}")


def test_replicas_start_on_the_initial_adapter_validated_once(service, versions):
    base, client = service
    status = client.status()
    assert (status["stable"]["uri"], status["stable"]["sha256"]) == versions["v1"]
    assert set(_running(client).values()) == {versions["v1"]}
    assert _served_versions(base, 6) == {versions["v1"][1]}


def test_roll_canary_promote_and_both_rollbacks(service, versions):
    base, client = service
    before = {r["id"]: r for r in client.status()["replicas"]}
    graphs = {k: r["compiled_graphs"] for k, r in before.items()}
    events = []

    # roll: every replica moves, in order, one at a time
    result = client.roll(versions["v2"][0], on_event=events.append)
    assert sorted(result["swapped"]) == sorted(before) and len(events) >= 3
    assert set(_running(client).values()) == {versions["v2"]}
    assert _served_versions(base, 6) == {versions["v2"][1]}

    # canary 34% of 3 replicas: exactly one replica moves, responses show both versions
    result = client.roll(versions["v3"][0], canary=34)
    assert len(result["swapped"]) == 1
    _settle(client, {versions["v3"][1]: 1, versions["v2"][1]: 2})
    status = client.status()
    assert status["canary"]["sha256"] == versions["v3"][1] and len(status["canary_replicas"]) == 1
    assert _served_versions(base) == {versions["v2"][1], versions["v3"][1]}

    # a canary is active: a second canary is refused, naming it
    with pytest.raises(RolloutConflictError, match="canary .* is active"):
        client.roll(versions["v4"][0], canary=50)

    # promote: the canary version goes everywhere and becomes stable
    result = client.promote()
    assert len(result["swapped"]) == 2
    assert set(_running(client).values()) == {versions["v3"]}
    assert client.status()["stable"]["sha256"] == versions["v3"][1] and client.status()["canary"] is None

    # rollback with a canary active: only the canary replica returns to stable
    client.roll(versions["v4"][0], canary=34)
    _settle(client, {versions["v4"][1]: 1, versions["v3"][1]: 2})
    result = client.rollback()
    assert len(result["swapped"]) == 1
    _settle(client, {versions["v3"][1]: 3})
    assert client.status()["canary"] is None and client.status()["stable"]["sha256"] == versions["v3"][1]

    # rollback without a canary: every replica returns to the previous stable version (v2)
    result = client.rollback()
    assert len(result["swapped"]) == 3
    assert set(_running(client).values()) == {versions["v2"]}
    assert client.status()["stable"]["sha256"] == versions["v2"][1]

    # rolling the version every replica already runs touches none
    swaps = {r["id"]: r["swaps"] for r in client.status()["replicas"]}
    assert client.roll(versions["v2"][0])["swapped"] == []
    assert {r["id"]: r["swaps"] for r in client.status()["replicas"]} == swaps

    # many swaps of different ranks, alphas and target subsets: nothing recompiled anywhere
    after = {r["id"]: r["compiled_graphs"] for r in client.status()["replicas"]}
    assert after == graphs
    history = [(h["kind"], h["result"]) for h in client.status()["history"]]
    kinds = ["roll", "canary", "promote", "canary", "rollback", "rollback", "roll"]
    assert history[-7:] == [(k, "ok") for k in kinds]


def test_bad_adapter_is_rejected_and_no_replica_is_touched(service, versions):
    base, client = service
    before = {r["id"]: (r["adapter_uri"], r["adapter_sha256"], r["swaps"]) for r in client.status()["replicas"]}
    with pytest.raises(AdapterValidationError) as info:
        client.roll(versions["bad"][0])
    assert versions["bad"][0] in str(info.value)
    assert any("DoRA" in p for p in info.value.problems) and any("rank_pattern" in p for p in info.value.problems)
    with pytest.raises(AdapterNotFoundError, match=f"s3://{BUCKET}/missing/v9"):
        client.roll(f"s3://{BUCKET}/missing/v9")
    after = {r["id"]: (r["adapter_uri"], r["adapter_sha256"], r["swaps"]) for r in client.status()["replicas"]}
    assert after == before  # same URI and sha256 everywhere, and no swap call made
    rejected = client.status()["rejected"].values()
    assert any(r["uri"] == versions["bad"][0] and any("DoRA" in p for p in r["problems"]) for r in rejected)


def test_same_weights_under_another_uri_are_another_version(service, versions, make_adapter, store_root,
                                                            eager_reference):
    """Identity is URI + sha256: v2's weights with another lora_alpha must serve with that alpha."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from hotswap.store import make_s3_client

    base, client = service
    v2 = make_adapter("rollout-v2", **VERSIONS["v2"])
    variant = store_root / "rollout-v2-alpha64"
    shutil.copytree(v2, variant, dirs_exist_ok=True)
    config = json.loads((v2 / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (variant / "adapter_config.json").write_text(json.dumps(config))
    s3 = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        s3.upload_file(str(variant / f), BUCKET, f"v2-alpha64/{f}")
    uri = f"s3://{BUCKET}/v2-alpha64"

    client.roll(versions["v2"][0])  # v2 staged and served first
    client.roll(uri)
    assert set(_running(client).values()) == {(uri, versions["v2"][1])}  # same sha256, another URI
    reference = eager_reference(variant)
    tokenizer = AutoTokenizer.from_pretrained(reference.base_model.model.name_or_path)
    for prompt in ("Hello", "The quick brown fox"):
        body = httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                          timeout=60).json()
        ids = tokenizer(prompt, return_tensors="pt")
        out = reference.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        assert body["choices"][0]["text"] == tokenizer.decode(out, skip_special_tokens=True), prompt


def test_a_pinned_roll_refuses_other_weights_and_takes_the_pinned_ones(service, versions):
    """``roll --sha256``: the client passes the pin; a mismatch names both digests and touches no replica."""
    _, client = service
    before = _running(client)
    with pytest.raises(AdapterValidationError, match=f"pinned {'0' * 64}") as info:
        client.roll(versions["v4"][0], sha256="0" * 64)
    assert versions["v4"][1] in str(info.value)
    assert _running(client) == before
    result = client.roll(versions["v4"][0], sha256=versions["v4"][1])
    assert result["version"]["sha256"] == versions["v4"][1]
    assert set(_running(client).values()) == {versions["v4"]}


def test_status_reports_every_field_per_replica(service):
    _, client = service
    status = client.status()
    assert {"stable", "canary", "rollout", "history", "replicas"} <= set(status)
    for r in status["replicas"]:
        assert {"id", "adapter_uri", "adapter_sha256", "swaps", "last_swap_ms", "last_drain_ms", "last_smoke_ms",
                "compiled_graphs", "pid", "slots", "rows_in_flight", "queued", "step_stats"} <= set(r)
        assert r["compiled_graphs"] >= 2 and r["swaps"] >= 1
        steps = r["step_stats"]  # the scheduler's accounting since the replica started: it has served requests
        assert steps["prefill_steps"] > 0 and steps["decode_steps"] > 0 and steps["tokens"] > 0
        assert 0 < steps["forward_s"] < steps["step_s"]
        assert r["last_drain_ms"] >= 0 and r["last_smoke_ms"] > 0 and r["pid"] > 0
        active = [slot for slot in r["slots"] if slot["active"]]
        assert len(r["slots"]) == 2 and len(active) == 1  # two resident slots, one serving
        assert active[0]["adapter_sha256"] == r["adapter_sha256"]


def test_cli_against_the_running_service(service, versions):
    """The console script reaches the running cluster and prints per-replica progress."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    run = lambda *a: subprocess.run([sys.executable, "-m", "hotswap.cli", *a, "--app", APP],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    rolled = run("roll", versions["v3"][0])
    assert rolled.returncode == 0, rolled.stderr
    assert "rolled" in rolled.stdout and rolled.stdout.count(": s3://") >= 1
    status = run("status", "--json")
    assert status.returncode == 0 and versions["v3"][1] in status.stdout
    rejected = run("roll", versions["bad"][0])
    assert rejected.returncode == 1 and versions["bad"][0] in rejected.stderr
    assert len(rejected.stderr.strip().splitlines()) == 1


def test_admin_routes_do_not_exist_without_a_token(service):
    base, _ = service
    for method, path in (("GET", "/admin/status"), ("POST", "/admin/roll"), ("POST", "/admin/rollback")):
        response = httpx.request(method, f"{base}{path}", headers={"authorization": "Bearer anything"}, timeout=30)
        assert response.status_code == 404
