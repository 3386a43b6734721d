"""The swap engine: one compiled, hotswap-prepared PeftModel whose LoRA weights change in place.

Lifecycle (in this order, as PEFT requires):

1. load the base model and wrap it with a LoRA adapter at ``max_rank`` on ``target_modules``
   (B = 0, so it serves the base model until an adapter is applied);
2. ``prepare_model_for_compiled_hotswap(target_rank=max_rank)`` (scalings become tensors);
3. ``torch.compile`` the causal LM, then warm up both generation shapes;
4. :meth:`SwapEngine.apply` staged adapters in place, under the lock that whole requests hold.

A swap copies into the same storage (every ``data_ptr`` is unchanged), so neither the
compiled graphs nor CUDA graphs notice it; no swap ever triggers a recompile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from hotswap.builtin import resolve_base_model
from hotswap.errors import ConfigError, SwapError
from hotswap.generation import Completion, SamplingParams, StaticBatchGenerator, TokenEvent
from hotswap.settings import HotswapSettings
from hotswap.staging import AdapterIdentity, StagedAdapter
from hotswap.validation import ModelSpec
from hotswap.versions import BASE

__all__ = ["BASE_IDENTITY", "EngineStats", "SwapEngine", "SwapLock", "resolve_device_dtype"]

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # a substring of no module path (peft#3780)
BASE_IDENTITY = BASE


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


class SwapLock:
    """Orders swaps against whole requests: one holder at a time, and a waiting swap goes first.

    A request holds it from its first token to its last, so it sees one adapter. A swap
    that is waiting stops new requests from entering (they queue behind it) and starts as
    soon as the requests in flight finish.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._swaps_waiting = 0

    @contextmanager
    def request(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and self._swaps_waiting == 0)
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    @contextmanager
    def swap(self, *, timeout_s: float | None = None) -> Iterator[None]:
        with self._cond:
            self._swaps_waiting += 1
            try:
                if not self._cond.wait_for(lambda: not self._busy, timeout=timeout_s):
                    raise SwapError(f"requests in flight did not finish within {timeout_s} s; the swap was not made")
                self._busy = True
            finally:
                self._swaps_waiting -= 1
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    @property
    def swap_waiting(self) -> bool:
        return self._swaps_waiting > 0


class _CountingBackend:
    """Inductor, counting every graph it compiles (per engine, unlike dynamo's global counters)."""

    def __init__(self, mode: str) -> None:
        self.graphs = 0
        self._inductor = torch._TorchCompileInductorWrapper(None if mode == "default" else mode, None, False)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        logger.info("compiling graph %d (%d nodes)", self.graphs, len(gm.graph.nodes))
        return self._inductor(gm, example_inputs)


class RestoreError(SwapError):
    """A failed swap could not be undone: the model is in an unknown state and must not serve."""


@dataclass(frozen=True)
class SwapTimings:
    drain_ms: float  # waiting for the requests in flight
    swap_ms: float  # the copy
    smoke_ms: float  # the smoke check, with new requests still held back


@dataclass(frozen=True)
class EngineStats:
    adapter: AdapterIdentity
    swaps: int
    last_swap_ms: float | None
    compiled_graphs: int


class SwapEngine:
    """A compiled, hotswap-prepared model plus the generator that serves it.

    Build it with :meth:`build`; apply staged adapters with :meth:`apply`; generate with
    :meth:`generate` or :meth:`stream`. Thread-safe: one lock orders everything.
    """

    def __init__(self, settings: HotswapSettings, *, peft_model, tokenizer, device, dtype) -> None:
        self.settings = settings
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.spec = ModelSpec.from_peft_model(peft_model, max_rank=settings.max_rank)
        self.lock = SwapLock()
        self._swapper = _InPlaceSwapper(peft_model, self.spec)
        self._current: StagedAdapter | None = None
        self.identity = BASE_IDENTITY
        self.swaps = 0
        self.last_swap_ms: float | None = None
        lm = peft_model.base_model.model
        self._backend = None
        forward = lm
        if settings.compile:
            self._backend = _CountingBackend(settings.compile_mode)
            # compile the causal LM, not the PeftModel wrapper: its forward reads peft_config, which
            # a swap updates, and dynamo would guard on it
            forward = torch.compile(lm, backend=self._backend, dynamic=False)
        self.generator = StaticBatchGenerator(
            forward,
            config=lm.config,
            tokenizer=tokenizer,
            batch_size=settings.max_batch_size,
            chunk=settings.prefill_chunk_tokens,
            max_seq_len=settings.max_seq_len,
            device=device,
            dtype=dtype,
        )

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
        engine = cls(settings, peft_model=peft_model, tokenizer=tokenizer, device=device, dtype=dtype)
        logger.info("loaded %s on %s (%s) in %.1f s", settings.base_model, device, dtype, time.perf_counter() - started)
        if warmup:
            engine.warmup()
        return engine

    def warmup(self) -> None:
        """Run both generation shapes once so that no request ever triggers a compile."""
        started = time.perf_counter()
        # two prefill chunks and one decode step: every shape and code path a request can take
        length = min(self.settings.prefill_chunk_tokens + 1, self.settings.max_seq_len - 2)
        with self.lock.request():
            self.generator.generate([[self.generator.pad_id] * length], [SamplingParams(max_tokens=2, ignore_eos=True)])
        logger.info("warm-up done in %.1f s, %d compiled graphs", time.perf_counter() - started, self.compiled_graphs)

    @property
    def compiled_graphs(self) -> int:
        """Graphs compiled by this engine so far (0 when not compiling)."""
        return self._backend.graphs if self._backend is not None else 0

    def stats(self) -> EngineStats:
        return EngineStats(self.identity, self.swaps, self.last_swap_ms, self.compiled_graphs)

    def apply(
        self,
        staged: StagedAdapter,
        *,
        method: Literal["foreach", "peft"] = "foreach",
        timeout_s: float | None = None,
    ) -> float:
        """Swap ``staged`` into the model in place and return the swap's duration in ms.

        Trusts ``staged``: it must come from :func:`~hotswap.staging.stage_adapter` for this
        engine's spec (checked by fingerprint, nothing else is re-validated). Waits for the
        requests in flight and holds new ones back meanwhile. If the copy fails half-way, the
        previous adapter is re-applied before :class:`SwapError` is raised, so the model is
        never left half-swapped.

        Args:
            method: 'foreach' copies every tensor in one batched call (the default);
                'peft' calls PEFT's ``hotswap_adapter_from_state_dict`` (same result, for comparison).
            timeout_s: how long to wait for in-flight requests before giving up (nothing changed).
        """
        self._check_fits(staged)
        with self.lock.swap(timeout_s=timeout_s):
            elapsed_ms = self._swap_locked(staged, method)
        return elapsed_ms

    def _check_fits(self, staged: StagedAdapter) -> None:
        if staged.spec_fingerprint != self.spec.fingerprint:
            raise SwapError(
                f"adapter {staged.identity.uri} was staged for another model layout (spec "
                f"{staged.spec_fingerprint[:12]}, this replica {self.spec.fingerprint[:12]}); stage it again "
                "against this service's settings"
            )

    def reset_to_base(self, *, timeout_s: float | None = None) -> None:
        """Zero every LoRA weight (serve the base model), under the swap lock."""
        with self.lock.swap(timeout_s=timeout_s):
            self._swap_locked(None)

    def swap_checked(self, staged: StagedAdapter | None, *, check: Callable[[], None],
                     timeout_s: float | None = None) -> SwapTimings:
        """Swap to ``staged`` (``None``: the base model) and run ``check`` under one hold of the swap lock.

        No request runs on the new adapter before ``check`` passes: requests queue behind the lock
        from the moment the swap waits until the check is done. If ``check`` raises, the previous
        adapter is put back (still under the lock) and :class:`SwapError` is raised; if putting it
        back fails too, :class:`RestoreError` is raised and the model must not serve.
        ``check`` runs with the lock held: it must use :meth:`smoke_check_unlocked`, not :meth:`smoke_check`.
        """
        if staged is not None:
            self._check_fits(staged)
        asked = time.perf_counter()
        with self.lock.swap(timeout_s=timeout_s):
            got = time.perf_counter()
            previous = self._current
            swap_ms = self._swap_locked(staged)
            checked = time.perf_counter()
            try:
                check()
            except Exception as e:
                name = staged.identity.uri if staged is not None else "the base model"
                try:
                    self._swap_locked(previous)
                except Exception as restore_error:
                    raise RestoreError(f"smoke check of {name} failed ({e}) and the previous adapter could not be "
                                       f"put back ({restore_error})") from restore_error
                raise SwapError(f"smoke check failed on {name}: {e}; previous adapter restored") from e
            done = time.perf_counter()
        return SwapTimings(drain_ms=(got - asked) * 1e3, swap_ms=swap_ms, smoke_ms=(done - checked) * 1e3)

    def _swap_locked(self, staged: StagedAdapter | None, method: str = "foreach") -> float:
        """Copy ``staged`` in (or zero every LoRA weight); the caller holds the swap lock. Returns ms."""
        started = time.perf_counter()
        if staged is None:
            self._swapper.zero()
            previous, self.identity, self._current = self.identity, BASE_IDENTITY, None
            self.swaps += 1
            logger.info("swapped %s -> the base model (all LoRA weights zero)", previous.uri)
            return (time.perf_counter() - started) * 1e3
        try:
            self._copy(staged, method)
        except Exception as e:
            logger.error("swap to %s failed (%s); restoring %s", staged.identity.uri, e, self.identity.uri)
            self._restore()
            raise SwapError(f"swap to adapter {staged.identity.uri} failed and was undone: {e}") from e
        elapsed_ms = (time.perf_counter() - started) * 1e3
        previous, self.identity, self._current = self.identity, staged.identity, staged
        self.swaps += 1
        self.last_swap_ms = elapsed_ms
        logger.info(
            "swapped %s -> %s (sha256 %s, r=%d) in %.2f ms",
            previous.uri,
            staged.identity.uri,
            staged.identity.sha256[:12],
            staged.rank,
            elapsed_ms,
        )
        return elapsed_ms

    @property
    def current(self) -> StagedAdapter | None:
        """The staged adapter the model runs now (None: the base model)."""
        return self._current

    def _copy(self, staged: StagedAdapter, method: str) -> None:
        if method == "foreach":
            self._swapper.apply(staged)
        elif method == "peft":
            from peft.utils.hotswap import hotswap_adapter_from_state_dict

            with torch.no_grad():
                hotswap_adapter_from_state_dict(
                    self.peft_model, staged.peft_state_dict(self.spec, ADAPTER_NAME), ADAPTER_NAME,
                    staged.lora_config(),
                )
            self._swapper.sync_after_external_swap(staged)
        else:
            raise ValueError(f"unknown swap method {method!r}; use 'foreach' or 'peft'")
        self._swapper.update_bookkeeping(staged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _restore(self) -> None:
        try:
            if self._current is None:
                self._swapper.zero()
            else:
                self._swapper.apply(self._current)
                self._swapper.update_bookkeeping(self._current)
        except Exception:  # pragma: no cover - only if the device itself is failing
            logger.exception("could not restore the previous adapter; this replica must be restarted")
            raise

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> tuple[list[Completion],
                                                                                          AdapterIdentity]:
        """Generate for a batch under the request lock; return completions and the adapter that made them."""
        with self.lock.request():
            return self.generator.generate(prompts, params), self.identity

    def last_logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token logits after each prompt (float32, CPU), under the request lock."""
        with self.lock.request():
            return self.generator.last_logits(prompts)

    def smoke_check(self, prompt: str = "Hello, world") -> None:
        """A short greedy generation that must give finite logits; raise :class:`SwapError` otherwise."""
        with self.lock.request():
            self.smoke_check_unlocked(prompt)

    def smoke_check_unlocked(self, prompt: str = "Hello, world") -> None:
        """:meth:`smoke_check` for a caller that already holds the lock (the ``check`` of :meth:`swap_checked`)."""
        logits = self.generator.last_logits([prompt])
        if not torch.isfinite(logits).all():
            raise SwapError(f"smoke check failed on adapter {self.identity.uri}: non-finite logits")
        self.generator.generate([prompt], [SamplingParams(max_tokens=2, ignore_eos=True)])

    @contextmanager
    def stream(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> Iterator[
        tuple[Iterator[TokenEvent], AdapterIdentity]
    ]:
        """Hold the request lock while the caller consumes the token events of one batch."""
        with self.lock.request():
            yield self.generator.stream(prompts, params), self.identity


class _InPlaceSwapper:
    """Copies staged LoRA matrices into the prepared parameters with batched ``torch._foreach_*`` calls.

    Parameter lists are collected once, at construction (after prepare). Per layer it
    tracks the rank currently live, so a swap zeroes only rows/columns that held the old
    adapter; the resulting weights are exactly those of PEFT's ``hotswap_adapter_from_state_dict``
    (tested), without its per-key Python loop.
    """

    def __init__(self, peft_model, spec: ModelSpec) -> None:
        modules = dict(peft_model.named_modules())
        self.model = peft_model
        self.modules = [modules[layer.name] for layer in spec.layers]
        self.A = [m.lora_A[ADAPTER_NAME].weight for m in self.modules]
        self.B = [m.lora_B[ADAPTER_NAME].weight for m in self.modules]
        self.scaling = [m.scaling[ADAPTER_NAME] for m in self.modules]
        if not all(isinstance(s, torch.Tensor) for s in self.scaling):
            raise SwapError("LoRA scalings are not tensors: call prepare_model_for_compiled_hotswap before the engine")
        self.max_rank = spec.max_rank
        self.live_rank = [self.max_rank] * len(self.modules)  # unknown at start: treat every row as live
        self._view_cache: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}

    @torch.no_grad()
    def apply(self, staged: StagedAdapter) -> None:
        new_rank = [0] * len(self.modules)
        for i in staged.layer_indices:
            new_rank[i] = staged.rank
        stale = []
        for i, (old, new) in enumerate(zip(self.live_rank, new_rank)):
            if old > new:
                stale += [self.A[i][new:old], self.B[i][:, new:old]]
        # until this swap completes, any row may hold either adapter: a restore must zero them all
        self.live_rank = [self.max_rank] * len(self.modules)
        if stale:
            torch._foreach_zero_(stale)
        dst = self._views(staged.rank, staged.layer_indices)
        src = [t for pair in zip(staged.lora_A, staged.lora_B) for t in pair]
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)
        scale = torch.tensor(staged.scaling, dtype=self.scaling[0].dtype)
        for s in self.scaling:
            s.fill_(scale)
        self.live_rank = new_rank

    def _views(self, rank: int, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Destination views (A rows, B columns up to ``rank``) per layer set, built once: views share storage."""
        key = (rank, layers)
        views = self._view_cache.get(key)
        if views is None:
            views = [v for i in layers for v in (self.A[i][:rank], self.B[i][:, :rank])]
            if len(self._view_cache) < 64:
                self._view_cache[key] = views
        return views

    def sync_after_external_swap(self, staged: StagedAdapter) -> None:
        """After PEFT's own swap (which zero-fills whole tensors), record the ranks now live."""
        self.live_rank = [0] * len(self.modules)
        for i in staged.layer_indices:
            self.live_rank[i] = staged.rank

    @torch.no_grad()
    def zero(self) -> None:
        torch._foreach_zero_(self.A + self.B)
        self.live_rank = [0] * len(self.modules)

    def update_bookkeeping(self, staged: StagedAdapter) -> None:
        """Keep PEFT's records true: ``peft_config`` and each layer's ``r``/``lora_alpha``."""
        for m in self.modules:
            m.r[ADAPTER_NAME] = staged.rank
            m.lora_alpha[ADAPTER_NAME] = staged.lora_alpha
        config = self.model.peft_config[ADAPTER_NAME]
        config.r = staged.rank
        config.lora_alpha = staged.lora_alpha
        config.use_rslora = staged.use_rslora
        config.target_modules = set(staged.target_modules)
