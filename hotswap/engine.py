"""The swap engine: one compiled PeftModel with resident adapter slots whose LoRA weights change in place.

Lifecycle (in this order, as PEFT requires):

1. load the base model and wrap it with ``adapter_slots`` LoRA adapters (``slot0``, ``slot1``) at
   ``max_rank`` on ``target_modules`` (B = 0: the base model until a version is loaded), all active;
2. ``prepare_model_for_compiled_hotswap(target_rank=max_rank)`` (scalings become tensors);
3. bind each slot's LoRA weights to one contiguous rank-major buffer (:mod:`hotswap.slots`) and
   replace each slot's scaling by one per-row tensor shared by its layers (the selector);
4. ``torch.compile`` the causal LM, start the scheduler (:mod:`hotswap.scheduler`), warm up both
   generation shapes;
5. :meth:`SwapEngine.swap_checked` loads a staged version into the slot no row reads, checks it
   there and makes it the active slot.

A load copies into the same storage (every ``data_ptr`` is unchanged), so neither the compiled
graphs nor CUDA graphs notice it; no load ever triggers a recompile. With two slots a swap
waits for nothing when the idle slot is free (``drain_ms == 0``) and otherwise only for the
rows still reading the older version; with one slot it drains (new requests wait, rows in
flight finish) as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hotswap.builtin import resolve_base_model
from hotswap.errors import ConfigError, SwapError
from hotswap.generation import Completion, SamplingParams
from hotswap.scheduler import Failed, Finished, Logits, Scheduler, SlotSelector, SlotState, Ticket
from hotswap.settings import HotswapSettings
from hotswap.slots import SlotLayout
from hotswap.staging import AdapterIdentity, StagedAdapter
from hotswap.validation import ModelSpec
from hotswap.versions import BASE

__all__ = ["BASE_IDENTITY", "SLOT_NAMES", "EngineStats", "RestoreError", "SwapEngine", "SwapTimings",
           "resolve_device_dtype"]

logger = logging.getLogger(__name__)

SLOT_NAMES = ("slot0", "slot1")  # PEFT adapter names: substrings of no module path (peft#3780)
ADAPTER_NAME = SLOT_NAMES[0]
BASE_IDENTITY = BASE
_SMOKE_PROMPT = "Hello, world"


def resolve_device_dtype(settings: HotswapSettings) -> tuple[torch.device, torch.dtype]:
    """Resolve ``device``/``dtype`` 'auto' values: CUDA + bfloat16 when available, else CPU + float32."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is visible; set device: cpu (or auto)")
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if cuda else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


class _CountingBackend:
    """Inductor, counting every graph it compiles (per engine, unlike dynamo's global counters).

    ``cpp_wrapper``: inductor writes the code that calls the kernels in C++ instead of Python. A step then costs
    one call from Python, and that call releases the GIL (inductor's JIT entry point), so the replica's event loop
    (Serve's request handling, tokenizing) runs while the compiled graph runs instead of taking turns with it
    (dynamo's guards and the scheduler's own Python around the call still hold it).
    """

    def __init__(self, mode: str, *, cpp_wrapper: bool = False) -> None:
        self.graphs = 0
        # given either way: False overrides a TORCHINDUCTOR_CPP_WRAPPER=1 in the environment
        self._inductor = torch._TorchCompileInductorWrapper(None if mode == "default" else mode,
                                                            {"cpp_wrapper": cpp_wrapper}, False)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        logger.info("compiling graph %d (%d nodes)", self.graphs, len(gm.graph.nodes))
        return self._inductor(gm, example_inputs)


class RestoreError(SwapError):
    """A failed swap could not be undone: the model is in an unknown state and must not serve."""


@dataclass(frozen=True)
class SwapTimings:
    drain_ms: float  # waiting for rows still reading the target slot (0 when it was free)
    swap_ms: float  # the copy into the slot
    smoke_ms: float  # the smoke check on the slot, before any request joins it


@dataclass(frozen=True)
class EngineStats:
    adapter: AdapterIdentity
    swaps: int
    last_swap_ms: float | None
    compiled_graphs: int
    slots: tuple[dict, ...] = ()


class _RowGate(torch.nn.Module):
    """Stands in for a slot's identity dropout: multiplies the LoRA input by the slot's per-row gate (1 for rows
    that read the slot, 0 for the others), so a slot a row does not read contributes an exact 0."""

    def __init__(self, gate: torch.Tensor) -> None:
        super().__init__()
        self.gate = gate  # a plain attribute, not a buffer: one tensor shared by every layer of the slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate


class _Waiter:
    """Collects one request's events for a blocking caller."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.completion: Completion | None = None
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None

    def __call__(self, event) -> None:
        if isinstance(event, Logits):
            self.logits = event.logits
        elif isinstance(event, Finished):
            self.completion = event.completion
            self.done.set()
        elif isinstance(event, Failed):
            self.error = event.error
            self.done.set()

    def wait(self, timeout_s: float | None = None) -> Completion:
        if not self.done.wait(timeout_s):
            raise TimeoutError
        if self.error is not None:
            raise self.error
        return self.completion


class SwapEngine:
    """A compiled, hotswap-prepared model with resident adapter slots, served by one scheduler thread.

    Build it with :meth:`build`. Requests: :meth:`submit` (events to a callback), :meth:`generate`
    and :meth:`last_logits` (blocking). Versions: :meth:`swap_checked` (load the idle slot, check,
    activate) or the slot-level :meth:`load` / :meth:`activate`. Thread-safe.
    """

    def __init__(self, settings: HotswapSettings, *, peft_model, tokenizer, device, dtype) -> None:
        self.settings = settings
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.spec = ModelSpec.from_peft_model(peft_model, max_rank=settings.max_rank)
        self.layout = SlotLayout.from_spec(self.spec)
        modules = dict(peft_model.named_modules())
        self._modules = [modules[layer.name] for layer in self.spec.layers]
        n = settings.adapter_slots
        self.slot_names = SLOT_NAMES[:n]
        self._buffers = []
        scales, gates = [], []
        for name in self.slot_names:
            if not all(isinstance(m.scaling[name], torch.Tensor) for m in self._modules):
                raise SwapError("LoRA scalings are not tensors: call prepare_model_for_compiled_hotswap before "
                                "the engine")
            if not all(isinstance(m.lora_dropout[name], torch.nn.Identity) for m in self._modules):
                raise SwapError("the engine's LoRA layers must have lora_dropout=0 (inference)")
            buffer = self.layout.allocate(dtype=dtype, device=device)
            self.layout.bind(self._modules, name, buffer)
            buffer.zero_()  # B = 0 already; A zero too, so the slot is exactly the packed base
            self._buffers.append(buffer)
            scale = torch.zeros((settings.max_batch_size, 1, 1), dtype=dtype, device=device)
            gate = torch.zeros((settings.max_batch_size, 1, 1), dtype=dtype, device=device)
            for m in self._modules:
                m.scaling[name] = scale
                m.lora_dropout[name] = _RowGate(gate)
            scales.append(scale)
            gates.append(gate)
        self._live_rank = [0] * n
        self._staged: list[StagedAdapter | None] = [None] * n
        self.slots = [SlotState(i) for i in range(n)]
        self.swaps = 0
        self.last_swap_ms: float | None = None
        self._swap_mutex = threading.Lock()
        lm = peft_model.base_model.model
        self._backend = None
        forward = lm
        if settings.compile:
            wrapper = settings.compile_wrapper
            if wrapper == "auto":
                wrapper = "cpp" if torch.device(device).type == "cpu" else "python"
            self._backend = _CountingBackend(settings.compile_mode, cpp_wrapper=wrapper == "cpp")
            # compile the causal LM, not the PeftModel wrapper: its forward reads peft_config, which
            # a swap updates, and dynamo would guard on it
            forward = torch.compile(lm, backend=self._backend, dynamic=False)
        self.scheduler = Scheduler(
            forward,
            config=lm.config,
            tokenizer=tokenizer,
            selector=SlotSelector(scales, gates),
            slots=self.slots,
            batch_size=settings.max_batch_size,
            chunk=settings.prefill_chunk_tokens,
            max_seq_len=settings.max_seq_len,
            max_queued=settings.max_queued_requests,
            device=device,
            dtype=dtype,
        )
        self.checker = self.scheduler.checker

    @classmethod
    def build(cls, settings: HotswapSettings, *, warmup: bool = True) -> SwapEngine:
        """Load the base model, add LoRA at ``max_rank``, prepare for hotswap, compile and warm up."""
        from peft import LoraConfig, get_peft_model
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype = resolve_device_dtype(settings)
        path = resolve_base_model(settings.base_model, cache_dir=settings.cache_dir)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        base.to(device).eval()
        window = getattr(base.config, "max_position_embeddings", None)
        if window is not None and settings.max_seq_len > window:
            raise ConfigError(
                f"max_seq_len={settings.max_seq_len} exceeds the base model's max_position_embeddings={window}; "
                f"set max_seq_len <= {window}"
            )
        present = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = sorted(set(settings.target_modules) - present)
        if missing:
            raise ConfigError(
                f"target_modules {missing} are not Linear modules of {settings.base_model}; "
                f"its Linear modules are {sorted(present)}"
            )
        config = LoraConfig(
            r=settings.max_rank,
            lora_alpha=settings.max_rank,
            target_modules=list(settings.target_modules),
            lora_dropout=0.0,
            init_lora_weights=True,  # B = 0: the base model until an adapter is applied
        )
        peft_model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        peft_model.eval()
        prepare_model_for_compiled_hotswap(peft_model, target_rank=settings.max_rank, check_compiled="error")
        for name in SLOT_NAMES[1:settings.adapter_slots]:
            peft_model.add_adapter(name, config)
        # every slot active in the one graph; the per-row selector decides what each row reads
        peft_model.base_model.set_adapter(list(SLOT_NAMES[:settings.adapter_slots]))
        peft_model.eval()
        prepare_model_for_compiled_hotswap(peft_model, target_rank=settings.max_rank, check_compiled="error")
        engine = cls(settings, peft_model=peft_model, tokenizer=tokenizer, device=device, dtype=dtype)
        logger.info("loaded %s on %s (%s) in %.1f s, %d adapter slots", settings.base_model, device, dtype,
                    time.perf_counter() - started, settings.adapter_slots)
        if warmup:
            engine.warmup()
        return engine

    def warmup(self) -> None:
        """Run both generation shapes once so that no request ever triggers a compile."""
        started = time.perf_counter()
        # two prefill chunks and one decode step: every shape and code path a request can take
        length = min(self.settings.prefill_chunk_tokens + 1, self.settings.max_seq_len - 2)
        self.generate([[self.scheduler.pad_id] * length], [SamplingParams(max_tokens=2, ignore_eos=True)])
        logger.info("warm-up done in %.1f s, %d compiled graphs", time.perf_counter() - started, self.compiled_graphs)

    def close(self) -> None:
        """Stop the scheduler thread (requests still queued or in flight fail)."""
        self.scheduler.close()

    # -- requests ------------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.checker.encode(prompt)

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        self.checker.check(prompt_len, params)

    def submit(self, token_ids: list[int], params: SamplingParams, *, on_event: Callable[[object], None],
               slot: int | None = None, version: AdapterIdentity | None = None, want_logits: bool = False,
               held: bool = False, probe: bool = False) -> Ticket:
        """Queue one request (already encoded); events go to ``on_event`` from the scheduler thread.

        ``slot=None`` joins the active slot when a row frees up; a slot index pins it to that slot
        (a smoke check). ``version`` pins it to the slot that serves that version, looked up atomically
        with the queueing (request-level A/B; :meth:`slot_for` then ``slot=`` could race a swap into
        that slot); a :class:`~hotswap.errors.RequestError` if no slot serves it. ``held`` keeps it in
        its row without stepping until ``scheduler.release(ticket)``; ``probe`` marks a swap check's own
        request (only those may join a slot loaded by :meth:`swap_checked` before its check passes). Raises
        :class:`~hotswap.errors.OverloadedError` when the admission queue is full and
        :class:`~hotswap.errors.RequestError` when it is invalid.
        """
        return self.scheduler.submit(token_ids, params, on_event=on_event, slot=slot, version=version,
                                     want_logits=want_logits, held=held, probe=probe)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams], *,
                 slot: int | None = None) -> tuple[list[Completion], AdapterIdentity]:
        """Generate for the prompts (each joins the batch on its own) and wait; return the completions and the
        version of the first (each completion names its own, ``Completion.version``)."""
        if not prompts or len(prompts) != len(params):
            raise ValueError("give one SamplingParams per prompt, and at least one prompt")
        waiters = []
        for prompt, p in zip(prompts, params):
            ids = self.encode(prompt)
            waiter = _Waiter()
            self.submit(ids, p, on_event=waiter, slot=slot)
            waiters.append(waiter)
        completions = [w.wait() for w in waiters]
        return completions, completions[0].version

    def last_logits(self, prompts: Sequence[str | Sequence[int]], *, slot: int | None = None) -> torch.Tensor:
        """Next-token logits (float32, CPU) after each prompt, through the same prefill shape as generation."""
        waiters = []
        for prompt in prompts:
            waiter = _Waiter()
            self.submit(self.encode(prompt), SamplingParams(max_tokens=1), on_event=waiter, slot=slot,
                        want_logits=True)
            waiters.append(waiter)
        for w in waiters:
            w.wait()
        return torch.stack([w.logits for w in waiters])

    def smoke_check(self, slot: int | None = None, *, prompt: str = _SMOKE_PROMPT,
                    timeout_s: float | None = None) -> None:
        """A short greedy generation on ``slot`` (default: the active one) that must give finite logits.

        Its request takes the next free row ahead of queued ones; if none frees up within ``timeout_s``
        (every row busy with long requests) :class:`SwapError` is raised.
        """
        version = self.slots[self.scheduler.active if slot is None else slot].version
        name = version.uri if version else "an empty slot"
        waiter = _Waiter()
        ticket = self.submit(self.encode(prompt), SamplingParams(max_tokens=2, ignore_eos=True), on_event=waiter,
                             slot=slot, want_logits=True, probe=True)
        try:
            waiter.wait(timeout_s)
        except TimeoutError:
            ticket.cancel()
            raise SwapError(f"smoke check on {name} got no batch row within {timeout_s:.3g} s (every row busy); "
                            "raise swap_timeout_s or max_batch_size") from None
        if not torch.isfinite(waiter.logits).all():
            raise SwapError(f"smoke check failed on adapter {name}: non-finite logits")

    # -- versions ------------------------------------------------------------------------------------------

    @property
    def identity(self) -> AdapterIdentity:
        """The version new requests get (the active slot's)."""
        return self.slots[self.scheduler.active].version

    @property
    def current(self) -> StagedAdapter | None:
        """The staged adapter of the active slot (None: the base model)."""
        return self._staged[self.scheduler.active]

    @property
    def active_slot(self) -> int:
        return self.scheduler.active

    @property
    def compiled_graphs(self) -> int:
        """Graphs compiled by this engine so far (0 when not compiling)."""
        return self._backend.graphs if self._backend is not None else 0

    def slot_for(self, version: AdapterIdentity) -> int | None:
        """The slot that serves ``version`` (checked, or loaded with :meth:`load`), to pin requests to it; None if
        no slot holds it, or the one that does is claimed by a swap, being written, not yet checked, or failed its
        check (``Scheduler.slot_serving``). To pin a request, ``submit(version=)`` looks it up atomically."""
        with self.scheduler.cond:
            return self.scheduler.slot_serving(version)

    def slot_info(self) -> list[dict]:
        """Per slot: the version it holds, whether it is active, its rows in flight and swaps into it."""
        with self.scheduler.cond:
            return [{"slot": s.index, "active": s.index == self.scheduler.active,
                     **(s.version.as_dict() if s.version is not None else {"adapter_uri": None}),
                     "rows": s.rows, "swaps": s.swaps} for s in self.slots]

    def stats(self) -> EngineStats:
        return EngineStats(self.identity, self.swaps, self.last_swap_ms, self.compiled_graphs,
                           tuple(self.slot_info()))

    def _check_fits(self, staged: StagedAdapter) -> None:
        if staged.spec_fingerprint != self.spec.fingerprint:
            raise SwapError(
                f"adapter {staged.identity.uri} was staged for another model layout (spec "
                f"{staged.spec_fingerprint[:12]}, this replica {self.spec.fingerprint[:12]}); stage it again "
                "against this service's settings"
            )

    def idle_slot(self) -> int:
        """The slot a swap loads into: the one new rows do not join (the only one, with one slot)."""
        return (self.scheduler.active + 1) % len(self.slots)

    def apply(self, staged: StagedAdapter | None, *, method: Literal["foreach", "peft"] = "foreach",
              timeout_s: float | None = None) -> float:
        """Swap to ``staged`` (``None``: the base model) without a smoke check; return the copy's ms.

        Trusts ``staged``: it must come from :func:`~hotswap.staging.stage_adapter` for this
        engine's spec (checked by fingerprint, nothing else is re-validated).

        Args:
            method: 'foreach' copies the packed slot prefix in one contiguous copy (the default);
                'peft' calls PEFT's ``hotswap_adapter_from_state_dict`` on the slot (same result, for comparison).
            timeout_s: how long to wait for rows still reading the target slot before giving up (nothing changed).
        """
        return self.swap_checked(staged, check=None, timeout_s=timeout_s, method=method).swap_ms

    def reset_to_base(self, *, timeout_s: float | None = None) -> None:
        """Serve the base model (every LoRA weight zero)."""
        self.swap_checked(None, check=None, timeout_s=timeout_s)

    def swap_checked(self, staged: StagedAdapter | None, *, check: Callable[..., None] | None = "default",
                     timeout_s: float | None = None, method: Literal["foreach", "peft"] = "foreach",
                     ) -> SwapTimings:
        """Load ``staged`` (``None``: the base model) into the idle slot, check it there, then make it active.

        No request joins the slot before ``check(slot, timeout_s=left)`` passes, except the check's own
        (``probe``) requests, e.g. :meth:`smoke_check`; ``left`` is what remains of ``timeout_s``, which
        bounds the wait for the slot and the check together. ``"default"`` is :meth:`smoke_check`, ``None``
        skips the check. Rows in flight on the active slot keep running on it meanwhile and finish on it.
        If the idle slot already holds the version (a revert to the previous one), it is made active again
        without a copy (checked first unless it passed a check since it was loaded). If the load or the
        check fails the active slot keeps serving and :class:`SwapError` is raised; with one slot the
        previous version is put back first (:class:`RestoreError` if that fails too: the model must not
        serve).
        """
        if staged is not None:
            self._check_fits(staged)
        identity = staged.identity if staged is not None else BASE
        with self._swap_mutex:
            asked = time.perf_counter()
            deadline = None if timeout_s is None else asked + timeout_s
            target = self.idle_slot()
            one_slot = len(self.slots) == 1
            if not one_slot and self.slots[target].version == identity:
                return self._flip(target, check, deadline)
            waited = self._claim(target, timeout_s=timeout_s, hold=one_slot)
            got = time.perf_counter() if waited else asked  # a free slot: nothing was drained
            previous = self._staged[target]
            try:
                try:
                    swap_ms = self._load_claimed(target, staged, method, checking=check is not None)
                except Exception as e:
                    raise self._undo(target, previous, one_slot, f"loading {_name(staged)} failed: {e}") from e
                checked = time.perf_counter()
                if check is not None:
                    try:
                        self._run_check(check, target, deadline)
                    except Exception as e:
                        raise self._undo(target, previous, one_slot, f"smoke check failed on {_name(staged)}: {e}"
                                         ) from e
                done = time.perf_counter()
                self.slots[target].checked = check is not None
                self.slots[target].swaps += 1
                if one_slot:
                    self.swaps += 1  # the load itself changed what the only slot serves
                self._activate(target)
            finally:
                with self.scheduler.cond:
                    self.scheduler.hold_unpinned = False
                    self.scheduler.cond.notify_all()
        logger.info("slot %d active: %s (drain %.2f ms, copy %.2f ms, check %.2f ms)", target, _name(staged),
                    (got - asked) * 1e3, swap_ms, (done - checked) * 1e3)
        return SwapTimings(drain_ms=(got - asked) * 1e3, swap_ms=swap_ms, smoke_ms=(done - checked) * 1e3)

    def _run_check(self, check, slot: int, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            raise SwapError("swap_timeout_s ran out before the smoke check could start")
        if check == "default":
            self.smoke_check(slot, timeout_s=left)
        else:
            check(slot, timeout_s=left)

    def _flip(self, slot: int, check, deadline: float | None) -> SwapTimings:
        """Make the idle slot, which already holds the version asked for, active again: no copy, no wait for its
        rows (they read that very version). Checked first unless it passed a check since it was loaded."""
        state = self.slots[slot]
        started = time.perf_counter()
        if check is not None and not state.checked:
            with self.scheduler.cond:
                state.checking = True
            try:
                self._run_check(check, slot, deadline)
            except Exception as e:
                with self.scheduler.cond:
                    state.checking = False
                    state.check_failed = True
                    self.scheduler.cond.notify_all()
                raise SwapError(f"smoke check failed on {state.version.uri}: {e}; still serving "
                                f"{self.identity.uri}") from e
            state.checked, state.check_failed = True, False
        smoke_ms = (time.perf_counter() - started) * 1e3
        self._activate(slot)
        self.last_swap_ms = 0.0
        logger.info("slot %d active again: %s (no copy)", slot, state.version.uri)
        return SwapTimings(drain_ms=0.0, swap_ms=0.0, smoke_ms=smoke_ms)

    def load(self, slot: int, staged: StagedAdapter | None, *, timeout_s: float | None = None) -> float:
        """Load ``staged`` into ``slot`` (not the active one), waiting up to ``timeout_s`` for its rows to finish;
        return the copy's ms. A failed load leaves the slot empty (nothing joins it) and raises :class:`SwapError`."""
        if staged is not None:
            self._check_fits(staged)
        self._check_slot(slot)
        with self._swap_mutex:
            if slot == self.scheduler.active:
                raise SwapError(f"slot {slot} is the active slot; load the idle slot ({self.idle_slot()}) and "
                                "activate it")
            self._claim(slot, timeout_s=timeout_s, hold=False)
            try:
                elapsed_ms = self._load_claimed(slot, staged, "foreach")
                self.slots[slot].swaps += 1
                return elapsed_ms
            except Exception as e:
                raise self._undo(slot, None, False, f"loading {_name(staged)} failed: {e}") from e

    def activate(self, slot: int) -> None:
        """Make ``slot`` the one new requests join (it must hold a version)."""
        self._check_slot(slot)
        with self._swap_mutex:
            if self.slots[slot].version is None:
                raise SwapError(f"slot {slot} holds no version; load one first")
            self._activate(slot)

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(self.slots):
            raise SwapError(f"slot must be 0..{len(self.slots) - 1}, got {slot!r}")

    def _claim(self, slot: int, *, timeout_s: float | None, hold: bool) -> bool:
        """Wait until no row reads ``slot`` and mark it loading (nothing joins it); ``hold`` stops unpinned
        requests from joining meanwhile (the one-slot drain). Returns whether it had to wait."""
        state, sched = self.slots[slot], self.scheduler
        free = lambda: state.rows == 0 and state.pinned_waiting == 0  # noqa: E731
        with sched.cond:
            sched.hold_unpinned = hold
            waited = not free()
            state.claimed = True  # requests pinned to its version from now on are refused: they cannot hold it off
            if waited and not sched.cond.wait_for(free, timeout=timeout_s):
                sched.hold_unpinned = state.claimed = False
                sched.cond.notify_all()
                raise SwapError(
                    f"{state.rows} request(s) still read adapter slot {slot} "
                    f"({state.version.short() if state.version else 'empty'}) after {timeout_s} s; the swap was "
                    "not made (raise swap_timeout_s, or retry when the long requests have finished)"
                )
            state.loading, state.claimed = True, False
        return waited

    def _load_claimed(self, slot: int, staged: StagedAdapter | None, method: str, *, checking: bool = False
                      ) -> float:
        started = time.perf_counter()
        scale = staged.scaling if staged is not None else 1.0
        if method == "foreach":
            self._copy(slot, staged)
        elif method == "peft":
            scale = self._peft_copy(slot, staged)
        else:
            raise ValueError(f"unknown swap method {method!r}; use 'foreach' or 'peft'")
        self._update_bookkeeping(slot, staged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        with self.scheduler.cond:
            state = self.slots[slot]
            previous = state.version
            state.version = staged.identity if staged is not None else BASE
            state.scale = scale
            state.loading = False
            state.checking = checking
            state.checked = state.check_failed = False
            self._staged[slot] = staged
            self.last_swap_ms = elapsed_ms
            self.scheduler.cond.notify_all()
        logger.info("slot %d: %s -> %s in %.2f ms", slot, previous.uri if previous else "empty", _name(staged),
                    elapsed_ms)
        return elapsed_ms

    @torch.no_grad()
    def _copy(self, slot: int, staged: StagedAdapter | None) -> None:
        """One contiguous copy of the packed prefix, one contiguous zero of the rank rows beyond it."""
        buffer, rank = self._buffers[slot], (staged.rank if staged is not None else 0)
        live = self._live_rank[slot]
        self._live_rank[slot] = self.layout.max_rank  # until this completes, any rank row may be dirty
        if staged is not None:
            buffer[:rank].copy_(staged.packed, non_blocking=True)
        if live > rank:
            buffer[rank:live].zero_()
        self._live_rank[slot] = rank

    @torch.no_grad()
    def _peft_copy(self, slot: int, staged: StagedAdapter | None) -> float:
        """PEFT's own ``hotswap_adapter_from_state_dict`` into the slot (the comparison path); returns the
        scaling PEFT computed.

        PEFT compares and fills ``scaling[name]`` as a scalar, so the slot's selector is set aside for a
        0-d tensor during the call (the scheduler is paused so no step sees that) and put back after.
        """
        if staged is None:
            self._copy(slot, None)
            return 1.0
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        name = self.slot_names[slot]
        self.scheduler.pause()
        selectors = [m.scaling[name] for m in self._modules]
        try:
            stand_ins = [torch.tensor(0.0) for _ in self._modules]
            for m, stand_in in zip(self._modules, stand_ins):
                m.scaling[name] = stand_in
            hotswap_adapter_from_state_dict(self.peft_model, staged.peft_state_dict(self.spec, name), name,
                                            staged.lora_config())
        finally:
            for m, selector in zip(self._modules, selectors):
                m.scaling[name] = selector
            self.scheduler.resume()
        self._live_rank[slot] = staged.rank
        scales = {float(stand_ins[i]) for i in staged.layer_indices}
        if len(scales) != 1:
            raise SwapError(f"PEFT set different scalings on the layers of {staged.identity.uri}: {sorted(scales)}")
        return scales.pop()

    def _update_bookkeeping(self, slot: int, staged: StagedAdapter | None) -> None:
        """Keep PEFT's records true: ``peft_config`` and each layer's ``r``/``lora_alpha`` of the slot."""
        if staged is None:
            return
        name = self.slot_names[slot]
        for m in self._modules:
            m.r[name] = staged.rank
            m.lora_alpha[name] = staged.lora_alpha
        config = self.peft_model.peft_config[name]
        config.r = staged.rank
        config.lora_alpha = staged.lora_alpha
        config.use_rslora = staged.use_rslora
        config.target_modules = set(staged.target_modules)

    def _undo(self, slot: int, previous: StagedAdapter | None, restore: bool, why: str) -> SwapError:
        """After a failed load or check of ``slot``: put ``previous`` back (one slot) or empty the slot (two)."""
        serving = self.slots[self.scheduler.active].version
        if restore:
            try:
                self._copy(slot, previous)
                self._update_bookkeeping(slot, previous)
            except Exception as e:
                logger.exception("could not restore the previous adapter; this replica must be restarted")
                error = RestoreError(f"{why}; and the previous adapter could not be put back ({e})")
                self.scheduler.stop_serving(error)  # nothing may run on the half-written slot, nothing may wait
                return error
            with self.scheduler.cond:
                state = self.slots[slot]
                state.version = previous.identity if previous is not None else BASE
                state.scale = previous.scaling if previous is not None else 1.0
                state.loading = state.checking = False
                self._staged[slot] = previous
                self.scheduler.cond.notify_all()
            logger.error("%s; previous adapter restored", why)
            return SwapError(f"{why}; previous adapter restored")
        try:
            self._copy(slot, None)
        except Exception:  # the slot stays empty either way: nothing joins it
            logger.exception("could not zero slot %d after a failed load", slot)
            self._live_rank[slot] = self.layout.max_rank
        with self.scheduler.cond:
            state = self.slots[slot]
            state.version, state.loading, state.checking = None, False, False
            self._staged[slot] = None
            self.scheduler.cond.notify_all()
        logger.error("%s; slot %d emptied, still serving %s", why, slot, serving.uri)
        return SwapError(f"{why}; still serving {serving.uri} (sha256 {serving.sha256[:12]})")

    def _activate(self, slot: int) -> None:
        """Make ``slot`` the one new rows join; a change of the version served counts as a swap. A failed check of it
        is forgotten: made active (after a check, or on the caller's word: ``apply``, ``activate``), it serves every
        request, pinned ones too, and one lock makes both true at once."""
        with self.scheduler.cond:
            self.slots[slot].checking = self.slots[slot].check_failed = False
            previous, self.scheduler.active = self.scheduler.active, slot
            if slot != previous and self.slots[previous].version != self.slots[slot].version:
                self.swaps += 1
            self.scheduler.cond.notify_all()
        if previous != slot:
            logger.info("active slot %d -> %d (%s)", previous, slot, self.slots[slot].version.uri)


def _name(staged: StagedAdapter | None) -> str:
    return staged.identity.uri if staged is not None else "the base model"
