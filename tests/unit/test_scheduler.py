"""The continuous-batching scheduler on the compiled tiny model, no Ray: rows join and leave between steps, two
adapter slots serve in one batch, a swap loads the idle slot under rows in flight, and nothing compiles again."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.errors import OverloadedError
from hotswap.generation import IncrementalText, SamplingParams, TokenEvent
from hotswap.scheduler import Failed, Finished, Started

pytestmark = pytest.mark.slow

PROMPTS = ["Hi", "12345678", "The quick brown fox", "Ünïcødé ✓", "z" * 20]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(make_adapter):
    return {
        "a": make_adapter("sched-a", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=41),
        "b": make_adapter("sched-b", r=16, lora_alpha=4, target_modules=("o_proj", "up_proj", "down_proj"), seed=42),
    }


def _eager_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def two_versions(compiled_engine, adapters, stage):
    """The compiled engine with version a active in one slot and b loaded in the other; returns
    ``{name: slot}``."""
    engine = compiled_engine
    engine.apply(stage(adapters["a"]))
    engine.load(engine.idle_slot(), stage(adapters["b"]))
    return {"a": engine.active_slot, "b": engine.idle_slot()}


class Recorder:
    """One request's events, recorded from the scheduler thread."""

    def __init__(self, log: list | None = None, name: str = "", after_tokens: dict | None = None) -> None:
        self.version = None
        self.tokens = 0
        self.text = ""
        self.completion = None
        self.error = None
        self.done = threading.Event()
        self.log, self.name = log, name
        self.after_tokens = after_tokens or {}  # token count -> a callable run then (from the scheduler thread)

    def __call__(self, event) -> None:
        if isinstance(event, Started):
            self.version = event.version
        elif isinstance(event, TokenEvent):
            self.tokens += 1
            self.text += event.delta
            action = self.after_tokens.pop(self.tokens, None)
            if action is not None:
                action()
        elif isinstance(event, Finished):
            self.completion = event.completion
            if self.log is not None:
                self.log.append(self.name)
            self.done.set()
        elif isinstance(event, Failed):
            self.error = event.error
            self.done.set()

    def wait(self):
        assert self.done.wait(120), f"{self.name or 'a request'} did not finish"
        assert self.error is None, self.error
        return self.completion


def _alone(engine, prompt: str, n: int, slot: int) -> list[int]:
    return engine.generate([prompt], [greedy(n)], slot=slot)[0][0].token_ids


@pytest.mark.parametrize("join_at", [1, 3, 7])
@pytest.mark.parametrize(("long_on", "joiner_on"), [("a", "a"), ("a", "b"), ("b", "a")])
def test_a_row_that_joins_mid_generation_gives_the_tokens_it_gives_alone(compiled_engine, two_versions, adapters,
                                                                         eager_reference, join_at, long_on,
                                                                         joiner_on):
    engine = compiled_engine
    long_prompt, joiner_prompt = PROMPTS[2], PROMPTS[4]  # 19 and 20 tokens: the joiner reads 3 prefill chunks
    long_alone = _alone(engine, long_prompt, 30, two_versions[long_on])
    joiner_alone = _alone(engine, joiner_prompt, 12, two_versions[joiner_on])
    assert joiner_alone == _eager_tokens(eager_reference(adapters[joiner_on]), engine.tokenizer, joiner_prompt, 12)
    assert long_alone == _eager_tokens(eager_reference(adapters[long_on]), engine.tokenizer, long_prompt, 30)
    joiner = Recorder()
    long = Recorder(after_tokens={join_at: lambda: engine.submit(
        engine.encode(joiner_prompt), greedy(12), on_event=joiner, slot=two_versions[joiner_on])})
    engine.submit(engine.encode(long_prompt), greedy(30), on_event=long, slot=two_versions[long_on])
    assert long.wait().token_ids == long_alone
    assert joiner.wait().token_ids == joiner_alone


def test_both_slots_in_one_batch_equal_two_eager_peft_models(compiled_engine, two_versions, adapters,
                                                             eager_reference):
    engine = compiled_engine
    requests = [("a", PROMPTS[0]), ("b", PROMPTS[1]), ("b", PROMPTS[3]), ("a", PROMPTS[2])]
    engine.scheduler.pause()  # all four join before the first step: one batch, both slots
    try:
        recorders = []
        for name, prompt in requests:
            recorders.append(Recorder())
            engine.submit(engine.encode(prompt), greedy(10), on_event=recorders[-1], slot=two_versions[name])
    finally:
        engine.scheduler.resume()
    for (name, prompt), recorder in zip(requests, recorders):
        completion = recorder.wait()
        assert completion.version.uri == str(adapters[name])
        assert completion.token_ids == _eager_tokens(eager_reference(adapters[name]), engine.tokenizer, prompt, 10)


def test_a_swap_into_the_idle_slot_under_rows_in_flight(compiled_engine, adapters, stage, eager_reference):
    """Rows in flight keep the old version's tokens (its eager reference); rows after the swap get the new one's;
    the swap waited for nothing."""
    engine = compiled_engine
    old, new = stage(adapters["a"]), stage(adapters["b"])
    engine.apply(old)
    started = threading.Event()
    in_flight = [Recorder(after_tokens={1: started.set}), Recorder()]
    for recorder, prompt in zip(in_flight, PROMPTS[:2]):
        engine.submit(engine.encode(prompt), greedy(40), on_event=recorder)
    assert started.wait(60)
    timings = engine.swap_checked(new)
    assert not any(r.done.is_set() for r in in_flight)  # still running when the new version took over
    after = engine.generate(PROMPTS[2:4], [greedy(12)] * 2)[0]
    old_model, new_model = eager_reference(adapters["a"]), eager_reference(adapters["b"])
    for recorder, prompt in zip(in_flight, PROMPTS[:2]):
        completion = recorder.wait()
        assert completion.version == old.identity
        assert completion.token_ids == _eager_tokens(old_model, engine.tokenizer, prompt, 40)
    for completion, prompt in zip(after, PROMPTS[2:4]):
        assert completion.version == new.identity
        assert completion.token_ids == _eager_tokens(new_model, engine.tokenizer, prompt, 12)
    assert timings.drain_ms < 50  # a condition check, never a generation's length


def test_compiled_graph_count_is_constant_across_joins_swaps_and_prompt_lengths(compiled_engine, adapters, stage):
    engine = compiled_engine
    staged = [stage(adapters["a"]), stage(adapters["b"])]
    engine.generate(["warm"], [greedy(1)])
    graphs = engine.compiled_graphs
    rng = random.Random(11)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for round_ in range(6):
            recorders = []
            for _ in range(rng.randint(3, 7)):  # more than the batch: some queue, then join as rows free up
                prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 45)))
                params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 0.8]),
                                        seed=rng.randint(0, 99), ignore_eos=True)
                recorders.append(Recorder())
                engine.submit(engine.encode(prompt), params, on_event=recorders[-1])
            engine.swap_checked(staged[round_ % 2])  # while they run
            for r in recorders:
                r.wait()
    assert engine.compiled_graphs == graphs
    assert engine.scheduler.steps["prefill"] > 0 and engine.scheduler.steps["decode"] > 0


def test_control_another_batch_shape_recompiles(compiled_engine):
    """The check above can fail: the compiled forward called with a shape the scheduler never uses recompiles."""
    engine = compiled_engine
    ids = torch.zeros((1, 3), dtype=torch.long)
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
        engine.scheduler.pause()
        try:
            with torch.no_grad():
                engine.scheduler.forward(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            engine.scheduler.resume()


def test_a_short_request_finishes_before_the_long_ones_running(compiled_engine):
    engine = compiled_engine
    order: list[str] = []
    started = threading.Event()
    longs = [Recorder(order, f"long{i}", after_tokens={2: started.set} if i == 0 else None) for i in range(3)]
    for recorder in longs:
        engine.submit(engine.encode(PROMPTS[0]), greedy(50), on_event=recorder)
    assert started.wait(60)
    short = Recorder(order, "short")
    engine.submit(engine.encode(PROMPTS[1]), greedy(4), on_event=short)
    short.wait()
    for r in longs:
        r.wait()
    assert order[0] == "short"


def test_a_cancelled_request_frees_its_row_for_a_queued_one(compiled_engine):
    engine = compiled_engine
    batch = engine.settings.max_batch_size
    engine.scheduler.pause()
    try:
        running = [Recorder() for _ in range(batch)]
        tickets = [engine.submit(engine.encode("x"), greedy(50), on_event=r) for r in running]
        queued = Recorder()
        engine.submit(engine.encode("y"), greedy(2), on_event=queued)
    finally:
        engine.scheduler.resume()
    tickets[0].cancel()
    queued.wait()  # it got the cancelled row while the others still run
    assert sum(r.done.is_set() for r in running[1:]) == 0
    for r in running[1:]:
        r.wait()
    assert not running[0].done.is_set() and running[0].tokens < 50  # no more tokens after the cancel
    assert engine.scheduler.in_flight() == 0


def test_a_full_admission_queue_refuses_with_a_clear_error(base_settings):
    from hotswap.engine import SwapEngine

    engine = SwapEngine.build(base_settings.model_copy(update={"compile": False, "max_queued_requests": 2}),
                              warmup=False)
    try:
        engine.scheduler.pause()
        recorders = [Recorder() for _ in range(engine.settings.max_batch_size + 2)]
        for r in recorders:  # a full batch plus a full queue
            engine.submit(engine.encode("x"), greedy(2), on_event=r)
        with pytest.raises(OverloadedError, match="admission queue is full \\(2 requests wait") as refused:
            engine.submit(engine.encode("x"), greedy(2), on_event=Recorder())
        assert refused.value.http_status == 429
        engine.scheduler.resume()
        for r in recorders:  # nothing taken was lost
            assert len(r.wait().token_ids) == 2
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(0, 258), max_size=40), stop=st.sampled_from([(), ("a",), ("ab", "\n"), ("zz",)]))
def test_incremental_text_equals_the_full_decode(tokenizer, tokens, stop):
    text = IncrementalText(tokenizer, stop)
    sent, stopped = "", False
    for token in tokens:
        delta, stopped = text.add(token)
        sent += delta
        if stopped:
            break
    if not stopped:
        sent += text.finish()
    full = tokenizer.decode(text.tokens, skip_special_tokens=True)
    cut = min((full.find(s) for s in stop if s in full), default=len(full))
    assert sent == text.text == full[:cut]


def test_control_the_full_decode_check_sees_a_lost_character(tokenizer):
    """The check above can fail: dropping the held-back tail (no ``finish``) loses text."""
    text = IncrementalText(tokenizer)
    ids = tokenizer("héllo ✓")["input_ids"]
    sent = "".join(text.add(t)[0] for t in ids[:-1])  # the last byte of '✓' never comes: it waits
    assert sent != tokenizer.decode(ids[:-1], skip_special_tokens=True)
