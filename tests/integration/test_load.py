"""Under load and under hostile input, on a real Ray Serve with 2 compiled replicas and adapters on a real S3
server on 127.0.0.1:

- 4 closed-loop clients while the controller rolls, canaries, promotes and rolls back through 4 versions:
  no failed request, every text equals what an eager PEFT reference gives for the version the response
  names (no torn response), and every replica's version changes only inside an operation that swapped it;
- 4 streaming and 4 non-streaming clients through 5 rolls: no failure, no torn text, no drain;
- a request held inside a replica across a swap finishes on the old version, and the swap does not wait for it;
- every case of the bad-adapter corpus is refused through the controller, naming the problem, with no
  replica touched and the controller state unchanged;
- fuzzed ``/v1/completions`` bodies (hypothesis) get 2xx or 4xx, never 5xx, and the service keeps serving.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from ray import serve

from benchmarks.load import ClosedLoop
from hotswap.client import HotswapClient
from hotswap.errors import HotswapError
from tests.corpus import HUGE_CAP_BYTES, write_corpus
from tests.fuzzing import fuzz_settings
from tests.integration.conftest import upload_versions, wait_for_condition
from tests.integration.faulty import HOLD_SEED, FaultyReplica

pytestmark = [pytest.mark.slow, pytest.mark.integration]

APP = "load"
BUCKET = "load"
MAX_TOKENS = 6
VERSIONS = {
    "v1": dict(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=91),
    "v2": dict(r=16, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"), seed=92),
    "v3": dict(r=4, lora_alpha=64, target_modules=("o_proj", "down_proj"), seed=93),
    "v4": dict(r=12, lora_alpha=24, target_modules=("gate_proj", "up_proj"), seed=94),
}
CANDIDATE_PROMPTS = ["Hello", "The quick brown fox", "Once upon a time", "ünïcödé ✓", "a b c d e f g", "0123456789",
                     "What is LoRA?", "zzz", "Swap me in place", "x y"]
MIN_LOGIT_GAP = 1e-4  # greedy choices closer than this could flip between eager and compiled arithmetic


@pytest.fixture(scope="module")
def versions(make_adapter, s3_server):
    """Upload every version to S3; name -> (uri, sha256, folder)."""
    folders = {name: make_adapter(f"load-{name}", **params) for name, params in VERSIONS.items()}
    return {name: (*uploaded, folders[name]) for name, uploaded in upload_versions(BUCKET, folders).items()}


def _greedy(model, tokenizer, prompt: str) -> tuple[str, float]:
    """Greedy text of ``MAX_TOKENS`` tokens (stopping at EOS, as the service does) and the smallest top-2 gap."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out, gap = [], float("inf")
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            top = torch.topk(model(input_ids=ids).logits[0, -1].float(), 2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            token = int(top.indices[0])
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True), gap


@pytest.fixture(scope="module")
def expected(versions, eager_reference):
    """sha256 -> prompt -> the eager PEFT reference's greedy text, for prompts that tell every version apart."""
    from transformers import AutoTokenizer

    texts: dict[str, dict[str, str]] = {}
    usable = set(CANDIDATE_PROMPTS)
    for _, sha, folder in versions.values():
        reference = eager_reference(folder)
        tokenizer = AutoTokenizer.from_pretrained(reference.base_model.model.name_or_path)
        texts[sha] = {}
        for prompt in CANDIDATE_PROMPTS:
            texts[sha][prompt], gap = _greedy(reference, tokenizer, prompt)
            if gap < MIN_LOGIT_GAP:
                usable.discard(prompt)
    # a prompt is only useful if each version answers it differently (a mislabelled answer would show)
    usable = [p for p in CANDIDATE_PROMPTS if p in usable and len({texts[s][p] for s in texts}) == len(texts)]
    assert len(usable) >= 3, f"only {usable} tell the 4 versions apart with a safe margin; change the seeds"
    return {sha: {p: by_prompt[p] for p in usable} for sha, by_prompt in texts.items()}


@pytest.fixture(scope="module")
def service(serve_cluster, versions, tiny_base, store_root, tmp_path_factory):
    from deployments.app import make_app
    from hotswap.controller import get_controller

    cache = tmp_path_factory.mktemp("load-cache")
    (cache / "fault-marks").mkdir()
    args = {
        "base_model": str(tiny_base),
        "initial_adapter": versions["v1"][0],
        "cache_dir": str(cache),
        "local_store_root": str(store_root),
        "max_adapter_bytes": HUGE_CAP_BYTES,
        "max_rank": 16,
        "max_batch_size": 4,
        "prefill_chunk_tokens": 8,
        "max_seq_len": 64,
        "device": "cpu",
    }
    serve.run(make_app(args, replica_class=FaultyReplica, replica_options={"num_replicas": 2}), name=APP,
              route_prefix=f"/{APP}")
    client = HotswapClient(APP)
    wait_for_condition(lambda: len(_live(client)) == 2, timeout_s=180, message="2 live replicas")
    yield f"{serve_cluster}/{APP}", client, cache / "fault-marks"
    serve.delete(APP)
    ray.kill(get_controller(APP))


def _live(client) -> dict[str, dict]:
    return {r["id"]: r for r in client.status()["replicas"] if r["live"]}


def _allowed(changes: list[tuple[float, float, str, str]], initial: str, started: float, finished: float) -> set[str]:
    """Versions a replica may have served a request with, given the operations that swapped it: the version it
    held when the request was sent, and both sides of every operation that overlapped the request."""
    held = initial
    allowed = set()
    for t0, t1, old, new in changes:
        if t1 <= started:
            held = new
        elif t0 < finished:
            allowed |= {old, new}
    return allowed | {held}


def test_no_failed_or_torn_response_while_rolling_through_versions(service, versions, expected, reliability):
    base, client, _ = service
    sha = {name: v[1] for name, v in versions.items()}
    uri = {name: v[0] for name, v in versions.items()}
    before = _live(client)
    held = {rid: r["adapter_sha256"] for rid, r in before.items()}
    initial = dict(held)
    changes: dict[str, list] = {rid: [] for rid in before}
    prompts = sorted(expected[sha["v1"]])
    cycle = [("roll", "v2"), ("canary", "v3"), ("promote", None), ("canary", "v4"), ("rollback", None),
             ("rollback", None), ("roll", "v1")]
    operations = 0

    def body(i: int, k: int) -> dict:
        return {"prompt": prompts[(i + k) % len(prompts)], "max_tokens": MAX_TOKENS, "temperature": 0}

    with ClosedLoop(f"{base}/v1/completions", clients=4, body=body, max_seconds=600) as load:
        load.wait_for(8)
        for _ in range(2):
            for kind, name in cycle:
                t0 = time.monotonic()
                if kind == "roll":
                    result = client.roll(uri[name])
                elif kind == "canary":
                    result = client.roll(uri[name], canary=50)
                else:
                    result = getattr(client, kind)()
                t1 = time.monotonic()
                operations += 1
                new = result["version"]["sha256"]
                for rid in result["swapped"]:
                    changes[rid].append((t0, t1, held[rid], new))
                    held[rid] = new
                load.wait_for(load.count() + 8)  # traffic between operations, on whatever each replica runs
    samples = load.samples

    failed = [s for s in samples if not s.ok]
    assert not failed, failed[:3]
    torn = [s for s in samples if s.text != expected[s.adapter_sha256][s.prompt]]
    assert not torn, [(s.prompt, s.adapter_sha256[:8], s.text) for s in torn[:3]]
    unexplained = [s for s in samples
                   if s.adapter_sha256 not in _allowed(changes[s.replica_id], initial[s.replica_id], s.started,
                                                        s.finished)]
    assert not unexplained, [(s.replica_id, s.adapter_sha256[:8]) for s in unexplained[:3]]
    after = _live(client)
    for rid in before:  # every swap a replica made was one an operation ordered
        assert after[rid]["swaps"] - before[rid]["swaps"] == len(changes[rid]), rid
    assert {s.adapter_sha256 for s in samples} == set(sha.values())  # every version did serve traffic
    reliability.record(
        "4 clients during 14 roll/canary/promote/rollback operations (2 replicas)",
        requests=len(samples), failed=len(failed), inputs=operations,
        held="0 failed; 0 torn (each text equals the eager reference of the version it names); every version "
             "change inside an operation that swapped that replica; swap counts match")


class _Streams:
    """``clients`` threads each streaming completions in a closed loop; records (prompt, text, sha, replica, ok)."""

    def __init__(self, url: str, *, clients: int, prompts: list[str]) -> None:
        self.url, self.prompts, self.results = url, prompts, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        k = 0
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                prompt = self.prompts[(i + k) % len(self.prompts)]
                k += 1
                try:
                    with http.stream("POST", self.url, json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                             "temperature": 0, "stream": True}) as r:
                        if r.status_code != 200:
                            self.results.append((prompt, r.read().decode(), "", "", False))
                            continue
                        text, ok = "", True
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[len("data: "):])
                            if "error" in chunk:
                                ok = False
                                break
                            text += chunk["choices"][0]["text"]
                        self.results.append((prompt, text, r.headers["x-adapter-sha256"], r.headers["x-replica-id"],
                                             ok))
                except httpx.HTTPError as e:
                    self.results.append((prompt, repr(e), "", "", False))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def test_streams_and_completions_share_the_batch_through_five_rolls(service, versions, expected, reliability):
    """4 streaming and 4 non-streaming clients while 5 rolls run: no failure, and every text (streamed or not)
    equals the eager reference of the version its headers name; every swap found a free slot (drain 0 ms)."""
    base, client, _ = service
    sha = {name: v[1] for name, v in versions.items()}
    prompts = sorted(expected[sha["v1"]])

    def body(i: int, k: int) -> dict:
        return {"prompt": prompts[(i + k) % len(prompts)], "max_tokens": MAX_TOKENS, "temperature": 0}

    drains = []
    with ClosedLoop(f"{base}/v1/completions", clients=4, body=body, max_seconds=600) as load, \
            _Streams(f"{base}/v1/completions", clients=4, prompts=prompts) as streams:
        load.wait_for(8)
        for name in ("v2", "v3", "v4", "v1", "v2"):
            result = client.roll(versions[name][0])
            assert result["version"]["sha256"] == sha[name]
            drains += [r["last_drain_ms"] for r in _live(client).values() if r["id"] in result["swapped"]]
            load.wait_for(load.count() + 8)
        wait_for_condition(lambda: len(streams.results) >= 8, timeout_s=120, message="streamed answers")
    samples, streamed = load.samples, list(streams.results)
    failed = [s for s in samples if not s.ok] + [r for r in streamed if not r[4]]
    assert not failed, failed[:3]
    torn = [s for s in samples if s.text != expected[s.adapter_sha256][s.prompt]]
    torn += [r for r in streamed if r[1] != expected[r[2]][r[0]]]
    assert not torn, torn[:3]
    assert drains and all(d == 0 for d in drains), drains
    reliability.record(
        "4 streaming + 4 non-streaming clients during 5 rolls (2 replicas, 2 adapter slots)",
        requests=len(samples) + len(streamed), failed=len(failed), inputs=5,
        held="0 failed; 0 torn, streamed or not (each text equals the eager reference of the version its headers "
             "name); every swap found a free slot (last_drain_ms 0)")


def test_a_request_held_across_a_swap_finishes_on_the_old_version(service, versions, expected, reliability):
    """A request in flight (held before its first token) does not hold the swap back: the replica loads the new
    version into its idle slot and the roll completes (drain 0 ms) while the request still runs; the request
    then finishes on the slot it started on, with the old version's exact text and headers."""
    base, client, marks = service
    live = _live(client)
    old = next(iter(live.values()))["adapter_sha256"]
    assert {r["adapter_sha256"] for r in live.values()} == {old}
    target = next(name for name, v in versions.items() if v[1] != old)
    prompt = sorted(expected[old])[0]
    answer: dict = {}
    (marks / "hold-request").touch()
    try:
        request = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                            "seed": HOLD_SEED}, timeout=120)))
        request.start()
        holding = wait_for_condition(lambda: list(marks.glob("holding-*")), timeout_s=30, message="a held request")
        victim = holding[0].name.removeprefix("holding-")
        result = HotswapClient._get(client.actor.roll.remote(versions[target][0]))  # done while it is held
        assert victim in result["swapped"]
        assert (marks / f"holding-{victim}").exists() and "r" not in answer  # still in flight
        moved = _live(client)[victim]
        assert moved["adapter_sha256"] == versions[target][1] and moved["last_drain_ms"] == 0
    finally:
        (marks / "hold-request").unlink(missing_ok=True)
    request.join(timeout=120)
    response = answer["r"]
    assert response.status_code == 200, response.text
    assert response.headers["x-replica-id"] == victim
    assert response.headers["x-adapter-sha256"] == old
    assert response.json()["choices"][0]["text"] == expected[old][prompt]
    reliability.record("a request held in flight across a swap", requests=1, failed=0, inputs=1,
                       held="the swap did not wait for it (drain 0 ms); it finished on the old version with its "
                            "exact text")


def test_every_corpus_adapter_is_refused_and_nothing_moves(service, make_adapter, store_root, reliability):
    _, client, _ = service
    good = make_adapter("valid-r8", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=11)
    cases = write_corpus(good, store_root)
    assert len(cases) >= 25

    def snapshot():
        status = client.status()
        return (status["stable"], status["canary"],
                {rid: (r["adapter_sha256"], r["swaps"]) for rid, r in _live(client).items()})

    before = snapshot()
    history = len(client.status()["history"])
    for case_id, case_uri, words in cases:
        with pytest.raises(HotswapError) as info:
            result = client.roll(case_uri)
            pytest.fail(f"corpus case {case_id} was rolled: {result}")
        message = str(info.value) + " ".join(getattr(info.value, "problems", []))
        assert words in message, (case_id, message)
        assert snapshot() == before, case_id  # stable, canary, every replica's version and swap count
    added = client.status()["history"][history:]
    # refusals of fetched adapters are recorded as rejected rolls; no rollout ran
    assert {(h["kind"], h["result"]) for h in added} == {("roll", "rejected")}
    reliability.record("bad-adapter corpus rolled through the controller", inputs=len(cases),
                       held=f"all {len(cases)} refused with the expected words; stable, canary and every replica's "
                            "version and swap count unchanged; no rollout started")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_FIELDS = {
    "prompt": st.text(max_size=200) | st.lists(st.text(max_size=20), max_size=3) | _JSON,
    "max_tokens": st.integers(min_value=-10, max_value=80) | st.integers() | _JSON,
    "temperature": st.floats() | _JSON,
    "top_p": st.floats() | _JSON,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | _JSON,
    "seed": st.integers() | _JSON,
    "stream": st.booleans() | _JSON,
    "n": st.integers() | _JSON,
    "model": st.text(max_size=20) | _JSON,
    "user": st.text(max_size=300) | _JSON,
    "logprobs": _JSON,
}
_VALID = {  # in range: these reach generation, with odd but legal values (tiny temperatures, top_p, seeds)
    "prompt": st.text(min_size=1, max_size=40).filter(str.strip),
    "max_tokens": st.integers(min_value=1, max_value=24),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=1e-9, max_value=1),
    "seed": st.integers(min_value=0, max_value=2**63 - 1),
    "stop": st.text(min_size=1, max_size=4),
    "stream": st.booleans(),
}
_BODIES = (st.fixed_dictionaries({"prompt": _VALID["prompt"]},
                                 optional={k: v for k, v in _VALID.items() if k != "prompt"})
           | st.fixed_dictionaries({}, optional=_FIELDS) | _JSON)


def test_fuzzed_completion_bodies_never_get_a_5xx(service, reliability):
    base, client, _ = service
    replicas = set(_live(client))
    seen: dict[int, int] = {}

    @fuzz_settings(150)
    @given(body=_BODIES)
    @example(body={"prompt": "0", "temperature": 1.7265425952315139e-77})  # a 500 once: NaN in the softmax
    def check_json(body):
        raw = json.dumps(body).encode()  # NaN and Infinity go out as the non-standard tokens Python writes
        response = httpx.post(f"{base}/v1/completions", content=raw, headers={"content-type": "application/json"},
                              timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body, response.text[:300])

    @fuzz_settings(50)
    @given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
    @example(raw=b'{"prompt": "lone \\ud800 surrogate"}', content_type="application/json")
    def check_bytes(raw, content_type):
        response = httpx.post(f"{base}/v1/completions", content=raw, headers={"content-type": content_type},
                              timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (raw, response.text[:300])

    check_json()
    check_bytes()
    assert 200 in seen and 400 in seen  # both valid and invalid bodies were generated
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "still here", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    assert set(_live(client)) == replicas  # no replica died or restarted
    reliability.record("fuzzed /v1/completions bodies (hypothesis)", requests=sum(seen.values()), failed=0,
                       inputs=sum(seen.values()),
                       held="never a 5xx (statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items()))
                            + "); the same replicas kept serving")
