"""The continuous-batching replica through real Ray Serve (one compiled replica, the tiny model, a local adapter):
a short request overtakes long streams, a client that disconnects frees its row, and a full admission queue
answers 429 with Retry-After while everything it took is still answered."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.conftest import wait_for_condition

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "engine-v2"
LONG = 200


@pytest.fixture(scope="module")
def marks(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-v2-cache")


@pytest.fixture(scope="module")
def app(serve_cluster, make_adapter, tiny_base, store_root, marks):
    from ray import serve

    from deployments.app import make_app
    from tests.integration.faulty import FaultyReplica

    adapter = make_adapter("engine-v2", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=61)
    args = {
        "base_model": str(tiny_base),
        "initial_adapter": str(adapter.relative_to(store_root)),
        "local_store_root": str(store_root),
        "cache_dir": str(marks),
        "max_rank": 16,
        "max_batch_size": 5,  # 4 long streams and one more row
        "prefill_chunk_tokens": 8,
        "max_seq_len": 256,
        "max_queued_requests": 2,
        "device": "cpu",
    }
    (marks / "fault-marks").mkdir()
    serve.run(make_app(args, replica_class=FaultyReplica, replica_options={"num_replicas": 1}), name=APP,
              route_prefix=f"/{APP}")
    base = f"{serve_cluster}/{APP}"
    wait_for_condition(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, timeout_s=180,
                       message="healthz")
    yield base
    serve.delete(APP)


def _stream(base: str, max_tokens: int, out: list, name: str, *, started: threading.Event | None = None) -> None:
    with httpx.Client(timeout=300) as http, http.stream(
            "POST", f"{base}/v1/completions",
            json={"prompt": "long", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "ignore_eos": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if started is not None and line.startswith("data: {"):
                started.set()
    out.append((name, time.monotonic()))


def test_a_short_request_finishes_before_long_streams_that_started_first(app):
    finished: list = []
    streams = []
    for i in range(4):
        started = threading.Event()
        t = threading.Thread(target=_stream, args=(app, LONG, finished, f"stream{i}"), kwargs={"started": started})
        t.start()
        streams.append((t, started))
    for _, started in streams:
        assert started.wait(120)  # every stream has its first token: all four rows are decoding
    response = httpx.post(f"{app}/v1/completions", json={"prompt": "short", "max_tokens": 4, "temperature": 0},
                          timeout=300)
    assert response.status_code == 200, response.text
    short_done = time.monotonic()
    assert response.json()["usage"]["completion_tokens"] <= 4
    for t, _ in streams:
        t.join(timeout=600)
    assert len(finished) == 4 and all(at > short_done for _, at in finished), (short_done, finished)


def test_a_full_admission_queue_answers_429_and_loses_nothing_it_took(app):
    """5 rows and 2 queue places: of 12 concurrent requests, the 7 taken are answered, the rest get a 429 naming
    the queue with Retry-After (the ingress does not retry: a client can)."""
    results: list = []

    def send() -> None:
        r = httpx.post(f"{app}/v1/completions", json={"prompt": "q", "max_tokens": 200, "temperature": 0,
                                                       "ignore_eos": True}, timeout=300)
        results.append(r)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    codes = sorted(r.status_code for r in results)
    refused = [r for r in results if r.status_code == 429]
    assert set(codes) <= {200, 429} and len(results) == 12, codes
    assert refused and len(results) - len(refused) >= 7, codes
    for r in refused:
        assert r.headers["retry-after"].isdigit()
        assert "admission queue is full" in r.json()["error"]["message"]
    assert httpx.post(f"{app}/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60
                      ).status_code == 200


def test_a_client_that_disconnects_frees_its_row(app, marks):
    """The stream's request is held in its row (it would never finish by itself), so only the disconnect can free
    the row (the final review: a 240-token stream finished on its own in 0.6 s, so the old test could not fail)."""
    from ray import serve

    from tests.integration.faulty import HOLD_SEED

    handle = serve.get_deployment_handle("ModelReplica", app_name=APP)
    hold = marks / "fault-marks" / "hold-request"
    hold.touch()
    try:
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{app}/v1/completions",
                json={"prompt": "gone", "max_tokens": 8, "temperature": 0, "stream": True, "seed": HOLD_SEED}) as r:
            assert r.status_code == 200  # the replica sent the version: the request is in its row
            wait_for_condition(lambda: handle.stats.remote().result()["rows_in_flight"] == 1, timeout_s=30,
                               message="the held stream in its row")
        # the client went away; the request is still held, so only the cancel can free the row
        wait_for_condition(lambda: handle.stats.remote().result()["rows_in_flight"] == 0, timeout_s=30,
                           message="the disconnected stream's row to be freed")
        assert hold.exists()
    finally:
        hold.unlink(missing_ok=True)


def test_malformed_direct_calls_get_a_400_not_an_exception(app):
    """Final review: a direct handle call with no prompt, or token ids outside the vocabulary, raised in the
    replica (or failed the whole batch's step) instead of answering 400."""
    from ray import serve

    handle = serve.get_deployment_handle("ModelReplica", app_name=APP)
    for request in ({}, {"prompt": [10**6]}, {"prompt": "x", "stop": ["s"] * 5}):
        answer = handle.complete.remote(request).result()
        assert answer["status"] == 400, (request, answer)


def test_a_failed_step_answers_500_with_an_incident_and_the_replica_serves_on(app, marks):
    """Defect (review of the v2 replica): the 500 path raised TypeError (a method shadowed by an attribute), so a
    failed step cut streams off and answered nothing useful."""
    fail = marks / "fault-marks" / "fail-step"
    fail.touch()
    try:
        response = httpx.post(f"{app}/v1/completions", json={"prompt": "boom", "max_tokens": 3}, timeout=60)
        assert response.status_code == 500, response.text
        assert "incident" in response.json()["error"]["message"]
        with httpx.stream("POST", f"{app}/v1/completions", json={"prompt": "boom", "max_tokens": 3, "stream": True},
                          timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert any("incident" in line for line in lines) and lines[-1] == "data: [DONE]", lines
        fail.unlink()
        # one that fails after its first text: an error event with the incident, then [DONE]
        with httpx.stream("POST", f"{app}/v1/completions", timeout=60, json={
                "prompt": "boom", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            first = next(lines)
            fail.touch()
            rest = list(lines)
        assert r.status_code == 200 and '"text"' in first, first
        assert any("incident" in line for line in rest) and rest[-1] == "data: [DONE]", rest
    finally:
        fail.unlink(missing_ok=True)
    assert httpx.post(f"{app}/v1/completions", json={"prompt": "fine", "max_tokens": 3}, timeout=60
                      ).status_code == 200
