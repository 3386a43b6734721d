"""Serving through real Ray Serve: two compiled replicas of a local checkpoint, an s3:// initial adapter on a
real S3 server on 127.0.0.1, OpenAI-style HTTP, adapter headers, 4xx for bad requests, no compile after warm-up."""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.integration.conftest import wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "serving"


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter("serving-v1", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "o_proj"), seed=51)


@pytest.fixture(scope="module")
def app(serve_cluster, s3_bucket_module, adapter, tiny_base, base_settings):
    """The app deployed with 2 replicas; yields (base URL, s3 URI, sha256, replica handle)."""
    from ray import serve

    from deployments.app import make_app

    client, bucket = s3_bucket_module
    uri = f"s3://{bucket}/serving/v1"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        client.upload_file(str(adapter / name), bucket, f"serving/v1/{name}")
    args = {
        "base_model": str(tiny_base),  # a local transformers checkpoint, loaded like any other
        "initial_adapter": uri,
        "cache_dir": str(base_settings.cache_dir),
        "max_rank": 16,
        "max_batch_size": 4,
        "prefill_chunk_tokens": 8,
        "max_seq_len": 64,
        "device": "cpu",
    }
    serve.run(make_app(args, replica_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}),
              name=APP, route_prefix=f"/{APP}")
    base = f"{serve_cluster}/{APP}"
    wait_for_condition(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, timeout_s=120,
                       message="healthz")
    sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    handle = serve.get_deployment_handle("ModelReplica", app_name=APP)
    yield base, uri, sha, handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def s3_bucket_module(s3_server):
    from hotswap.store import make_s3_client

    client = make_s3_client(connect_timeout_s=2, read_timeout_s=2)
    client.create_bucket(Bucket="serving")
    return client, "serving"


def _replica_stats(handle, count=2) -> dict[str, dict]:
    """Stats of every replica, by id (the router spreads calls over replicas)."""
    seen: dict[str, dict] = {}

    def collect():
        for _ in range(8):
            s = handle.stats.remote().result(timeout_s=30)
            seen[s["id"]] = s
        return len(seen) >= count

    wait_for_condition(collect, timeout_s=60, message=f"stats from {count} replicas")
    return seen


def _complete(base, **body):
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def _eager(reference, tokenizer, prompt, max_tokens):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    finish = "stop" if tokenizer.eos_token_id in tokens else "length"
    if finish == "stop":
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True), finish


PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "ünïcödé ✓", "a b c d e f g h i j k l m n o p"]


def test_greedy_completions_equal_eager_peft(app, adapter, eager_reference):
    from transformers import AutoTokenizer

    base, uri, sha, _ = app
    reference = eager_reference(adapter)
    tokenizer = AutoTokenizer.from_pretrained(reference.base_model.model.name_or_path)
    for prompt in PROMPTS:
        response = _complete(base, prompt=prompt, max_tokens=12, temperature=0)
        assert response.status_code == 200, response.text
        body = response.json()
        text, finish = _eager(reference, tokenizer, prompt, 12)
        assert body["choices"][0]["text"] == text, prompt
        assert body["choices"][0]["finish_reason"] == finish
        assert response.headers["x-adapter-uri"] == uri == body["adapter_uri"]
        assert response.headers["x-adapter-sha256"] == sha == body["adapter_sha256"]
        assert response.headers["x-replica-id"]  # the replica that answered, as `hotswap status` names it
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 12


@pytest.mark.parametrize("max_tokens", [10, 1], ids=["ten-tokens", "whole-answer-in-the-first-item"])
def test_streaming_gives_the_same_text_and_headers(app, max_tokens):
    """The response ends with [DONE] right after the chunk that carries the finish reason (also when the replica's
    first item, which names the version, carries the whole answer)."""
    base, uri, sha, _ = app
    plain = _complete(base, prompt="stream me", max_tokens=max_tokens, temperature=0).json()
    with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                      json={"prompt": "stream me", "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-adapter-uri"] == uri and r.headers["x-adapter-sha256"] == sha
        assert r.headers["x-replica-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["adapter_sha256"] == sha for c in chunks)


@pytest.mark.parametrize("max_tokens", [10, 1], ids=["ten-tokens", "whole-answer-in-the-first-item"])
def test_stream_ends_in_the_message_with_the_finish_reason(app, max_tokens):
    """The ingress's response body, message by message (what HTTP turns into chunks and the client into reads):
    ``[DONE]`` goes in the same message as the chunk with the finish reason, the last one, instead of one more
    message once the replica's stream closes; the replica's stream is then read to its end in the background.
    The ingress's own streaming code against the app's real replicas, outside Serve, so nothing merges messages."""
    import asyncio

    from deployments.ingress import Ingress, _draining

    _, _, sha, handle = app
    ingress = object.__new__(Ingress.func_or_class)  # only what _stream uses: the handle to the replicas
    ingress.replica = handle
    request = {"prompt": "stream me", "max_tokens": max_tokens, "temperature": 0}

    async def body() -> list[str]:
        response = await ingress._stream(request, lambda item, adapter: [
            {"text": item["delta"], "finish_reason": item["finish_reason"], "sha": adapter["adapter_sha256"]}])
        messages = [m async for m in response.body_iterator]
        await asyncio.wait_for(asyncio.gather(*_draining), timeout=60)  # the replica's stream, read to its end
        return messages

    messages = asyncio.run(body())
    assert messages[-1].endswith("data: [DONE]\n\n"), messages
    events = [e.removeprefix("data: ") for e in messages[-1].split("\n\n") if e]
    assert len(events) >= 2 and events[-1] == "[DONE]", messages  # the last chunk and [DONE], together
    last = json.loads(events[-2])
    assert last["finish_reason"] is not None and last["sha"] == sha
    assert all("[DONE]" not in m for m in messages[:-1])
    assert not _draining


@pytest.mark.parametrize("max_tokens", [10, 1], ids=["ten-tokens", "whole-answer-in-the-first-item"])
def test_a_client_gone_right_after_the_last_message_leaves_the_replica_stream_read_to_its_end(app, max_tokens):
    """Starlette stops reading the body when the client goes: the generator is closed at the yield of the last
    message. The replica's stream must still be read to its end (before, the drain started after that yield, so a
    client gone at once skipped it and the replica's generator was cancelled mid-way)."""
    import asyncio

    from deployments.ingress import Ingress, _draining

    handle = app[3]
    ingress = object.__new__(Ingress.func_or_class)
    ingress.replica = handle
    request = {"prompt": "stream and leave", "max_tokens": max_tokens, "temperature": 0}

    async def leave_after_the_last_message() -> int:
        response = await ingress._stream(request, lambda item, adapter: [{"text": item["delta"]}])
        body = response.body_iterator
        async for message in body:
            if message.endswith("data: [DONE]\n\n"):
                break
        await body.aclose()  # the client is gone: nothing more is read
        draining = len(_draining)
        await asyncio.wait_for(asyncio.gather(*_draining), timeout=60)
        return draining

    assert asyncio.run(leave_after_the_last_message()) == 1
    assert not _draining


BAD_BODIES = [
    ("not-json", b"{nope", "not valid JSON"),
    ("array-body", b"[1, 2]", ""),
    ("missing-prompt", {"max_tokens": 3}, "'prompt' is required"),
    ("prompt-number", {"prompt": 5}, "'prompt' must be"),
    ("prompt-empty", {"prompt": ""}, "'prompt' must be"),
    ("prompt-two", {"prompt": ["a", "b"]}, "'prompt' must be"),
    ("max-tokens-negative", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("max-tokens-string", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("max-tokens-huge", {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ("over-window", {"prompt": "x", "max_tokens": 1000}, "context window"),
    ("prompt-too-long", {"prompt": "y" * 500, "max_tokens": 1}, "context window"),
    ("temperature-type", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("temperature-range", {"prompt": "x", "temperature": 9}, "temperature"),
    ("top-p-zero", {"prompt": "x", "top_p": 0}, "top_p"),
    ("stop-too-many", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be"),
    ("n-two", {"prompt": "x", "n": 2}, "'n'"),
    ("stream-type", {"prompt": "x", "stream": "yes"}, "stream"),
    ("unknown-field", {"prompt": "x", "best_of": 3}, "unknown field 'best_of'"),
    ("seed-negative", {"prompt": "x", "seed": -1}, "seed"),
]


@pytest.mark.parametrize(("body", "message"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_requests_get_a_4xx_json_error(app, body, message):
    base = app[0]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    response = httpx.post(f"{base}/v1/completions", timeout=60, **kwargs)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_streamed_bad_request_is_a_4xx_too(app):
    response = _complete(app[0], prompt="x", max_tokens=1000, stream=True)
    assert response.status_code == 400 and "context window" in response.json()["error"]["message"]


def test_an_oversized_body_is_refused_with_413_before_it_is_read(app):
    """Defect 13: the HTTP body size was unbounded. Declared (content-length) and streamed (chunked) alike."""
    from deployments.ingress import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    declared = httpx.post(f"{app[0]}/v1/completions", content=big, timeout=120,
                          headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "request body over" in declared.json()["error"]["message"]
    chunked = httpx.post(f"{app[0]}/v1/completions", content=iter([big[i:i + (1 << 20)] for i in
                                                                    range(0, len(big), 1 << 20)]),
                         timeout=120, headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    # a legal 1,000,000-character prompt is still read (and refused for its length by the tokenizer's check)
    legal = _complete(app[0], prompt="y" * 1_000_000, max_tokens=1)
    assert legal.status_code == 400 and "context window" in legal.json()["error"]["message"]


def test_models_and_health(app):
    base = app[0]
    models = httpx.get(f"{base}/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert httpx.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"


def test_concurrent_requests_are_batched_without_changing_greedy_results(app):
    base = app[0]
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(12)]
    sequential = [_complete(base, prompt=p, max_tokens=8, temperature=0).json()["choices"][0]["text"]
                  for p in prompts]
    with ThreadPoolExecutor(12) as pool:
        concurrent = list(pool.map(lambda p: _complete(base, prompt=p, max_tokens=8, temperature=0), prompts))
    assert [r.json()["choices"][0]["text"] for r in concurrent] == sequential


def test_compiled_graphs_stay_constant_over_mixed_traffic(app):
    base, uri, sha, handle = app
    before = _replica_stats(handle)
    assert len(before) == 2
    assert all(s["compiled_graphs"] >= 2 and s["adapter_uri"] == uri and s["adapter_sha256"] == sha
               for s in before.values())
    rng = random.Random(3)
    bodies = [
        {"prompt": "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 40))),
         "max_tokens": rng.randint(1, 12), "temperature": rng.choice([0, 0.7]), "seed": rng.randint(0, 9),
         "stream": rng.random() < 0.2}
        for _ in range(60)
    ]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda b: httpx.post(f"{base}/v1/completions", json=b, timeout=120).status_code,
                                 bodies))
    assert statuses == [200] * len(bodies)
    after = _replica_stats(handle)
    assert {k: v["compiled_graphs"] for k, v in after.items()} == {k: v["compiled_graphs"] for k, v in before.items()}


def test_metrics_per_adapter_version_reach_rays_prometheus_endpoint(app):
    """The README's metric names, tagged with the adapter, on Ray's Prometheus endpoint (prefix ray_)."""
    import os

    base, uri, sha, _ = app
    assert _complete(base, prompt="count me", max_tokens=2).status_code == 200
    assert _complete(base, prompt="x", max_tokens=1000).status_code == 400  # counted as an invalid request
    names = ("ray_hotswap_requests_total", "ray_hotswap_request_errors_total", "ray_hotswap_generated_tokens_total",
             "ray_hotswap_request_latency_ms_count")

    def exported():
        text = httpx.get(os.environ["HOTSWAP_TEST_METRICS_URL"], timeout=10).text
        lines = [line for line in text.splitlines() if f'adapter_uri="{uri}"' in line]
        return all(any(line.startswith(n) for line in lines) for n in names) and lines

    lines = wait_for_condition(exported, timeout_s=90, interval_s=2, message="hotswap metrics exported")
    assert any(f'adapter_sha256="{sha[:12]}"' in line for line in lines)
    assert any(line.startswith("ray_hotswap_request_errors_total") and 'kind="invalid"' in line for line in lines)
