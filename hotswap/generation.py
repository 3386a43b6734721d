"""Batched generation with two fixed shapes, so a compiled model never compiles again after warm-up.

Every forward call has one of two shapes: a prefill chunk ``(max_batch_size,
prefill_chunk_tokens)`` or a decode step ``(max_batch_size, 1)``, over a static KV cache of
``max_seq_len + prefill_chunk_tokens`` slots. Prompts are left-padded to a multiple of the
chunk; unused batch rows are padding. Each row's attention mask admits only its own tokens,
so a row's greedy result does not depend on the other rows. (``torch.compile(model).generate``
would run the uncompiled forward; this loop calls the compiled module directly.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from hotswap.errors import RequestError

__all__ = ["Completion", "SamplingParams", "StaticBatchGenerator", "TokenEvent"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is generated. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenEvent:
    """Progress of one row: new text (possibly empty), and the finish reason once it is done."""

    row: int
    delta: str
    finish_reason: FinishReason | None = None


@dataclass
class _Row:
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None


class StaticBatchGenerator:
    """Runs ``forward`` (compiled or eager) over fixed shapes; not thread-safe (the engine's lock orders callers).

    Args:
        forward: the causal LM module (``LlamaForCausalLM`` with LoRA layers, or its compiled wrapper).
        config: the model config (for the static cache).
        tokenizer: a ``transformers`` tokenizer.
        batch_size: rows per forward call.
        chunk: prefill chunk length.
        max_seq_len: prompt + completion tokens allowed per request.
    """

    def __init__(
        self,
        forward: Callable,
        *,
        config,
        tokenizer,
        batch_size: int,
        chunk: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        from transformers import StaticCache

        self.forward = forward
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chunk = chunk
        self.max_seq_len = max_seq_len
        self.device = device
        self.dtype = dtype
        self.cache_len = max_seq_len + chunk
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.cache = StaticCache(config=config, max_cache_len=self.cache_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(
            batch_size=batch_size,
            num_heads=config.num_key_value_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )
        self._slots = torch.arange(self.cache_len, device=device)
        self._min = torch.finfo(dtype).min

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids for a prompt (text is tokenized with the tokenizer's special tokens)."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ('\ud800') crashes the tokenizer with a TypeError
                raise RequestError(f"prompt is not valid unicode ({e.reason} at character {e.start}); "
                                   "send UTF-8 text") from None
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise RequestError("prompt is empty after tokenization; send at least one character")
        return ids

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise :class:`RequestError` if a request cannot be served within the window."""
        if params.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if prompt_len + params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the context window of "
                f"{self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )
        if params.temperature < 0 or not math.isfinite(params.temperature):
            raise RequestError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {params.top_p}")

    def generate(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        """Generate for up to ``batch_size`` prompts together and return their completions."""
        rows: list[_Row] = []
        for _ in self.stream(prompts, params, rows_out=rows):
            pass
        return [Completion(r.text, r.tokens, r.finish_reason or "length", r.prompt_len) for r in rows]

    @torch.no_grad()
    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        rows_out: list | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as tokens are decided; every row ends with one carrying its finish reason."""
        if not 1 <= len(prompts) <= self.batch_size or len(prompts) != len(params):
            raise RequestError(f"a batch holds 1 to {self.batch_size} prompts, each with its params")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params):
            self.check(len(ids), p)
        rows = [
            _Row(len(ids), p, torch.Generator().manual_seed(p.seed) if p.seed is not None else None)
            for ids, p in zip(encoded, params)
        ]
        if rows_out is not None:
            rows_out.extend(rows)

        logits, next_pos, valid, padded = self._prefill(encoded)
        b = self.batch_size
        for slot in range(padded, padded + max(p.max_tokens for p in params)):
            chosen = self._choose(logits[:, -1, :].float(), rows)
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    event = self._advance(i, row, chosen[i])
                    if event is not None:
                        yield event
            if all(r.finish_reason is not None for r in rows):
                return
            valid[:, slot] = True
            tokens = torch.tensor(chosen + [self.pad_id] * (b - len(chosen)), device=self.device).view(b, 1)
            logits = self._step(tokens, next_pos, valid, slot)
            next_pos = next_pos + 1

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[str | Sequence[int]]) -> torch.Tensor:
        """Next-token logits (float32, CPU) after each prompt, through the same prefill shape as generation."""
        if not 1 <= len(prompts) <= self.batch_size:
            raise RequestError(f"a batch holds 1 to {self.batch_size} prompts")
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self.check(len(ids), SamplingParams(max_tokens=1))
        logits = self._prefill(encoded)[0]
        return logits[: len(prompts), -1, :].float().cpu()

    def _prefill(self, encoded: list[list[int]]):
        b, chunk = self.batch_size, self.chunk
        padded = math.ceil(max(len(ids) for ids in encoded) / chunk) * chunk
        input_ids = torch.full((b, padded), self.pad_id, dtype=torch.long)
        positions = torch.zeros((b, padded), dtype=torch.long)
        valid = torch.zeros((b, self.cache_len), dtype=torch.bool)
        for i in range(b):
            ids = encoded[i] if i < len(encoded) else [self.pad_id]
            start = padded - len(ids)
            input_ids[i, start:] = torch.tensor(ids)
            positions[i, start:] = torch.arange(len(ids))
            valid[i, start:padded] = True
        input_ids, positions, valid = (t.to(self.device) for t in (input_ids, positions, valid))
        self.cache.reset()
        logits = None
        for start in range(0, padded, chunk):
            end = start + chunk
            # contiguous copies: a slice keeps the padded tensor's stride, which would be a new guard per length
            ids, pos = input_ids[:, start:end].contiguous(), positions[:, start:end].contiguous()
            logits = self._step(ids, pos, valid, start)
        return logits, positions[:, -1:] + 1, valid, padded

    def _step(self, tokens, positions, valid, start: int):
        q = tokens.shape[1]
        slots = self._slots[start : start + q]
        # a query attends to valid slots up to its own, and always to itself (a padding query would
        # otherwise have no key at all and turn the cache's padding slots into NaN)
        allowed = (valid[:, None, :] & (self._slots[None, None, :] <= slots[None, :, None])) | (
            self._slots[None, None, :] == slots[None, :, None]
        )
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, self._min)
        out = self.forward(
            input_ids=tokens,
            attention_mask=mask[:, None, :, :],
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        chosen = []
        for i, row in enumerate(rows):
            p = row.params
            if p.temperature == 0 or row.finish_reason is not None:
                chosen.append(greedy[i])
                continue
            # Shift so the top logit is 0, then scale in float64: a temperature that rounds to 0 in float32
            # (the API allows any float >= 0) would give inf - inf = NaN; this way it tends to greedy.
            row_logits = logits[i].cpu().double()
            probs = torch.softmax((row_logits - row_logits.max()) / p.temperature, dim=-1)
            if p.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
            chosen.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return chosen

    def _advance(self, i: int, row: _Row, token: int) -> TokenEvent | None:
        if token in self.eos_ids and not row.params.ignore_eos:
            return self._finish(i, row, "stop")
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in row.params.stop:
            at = row.text.find(stop)
            if stop and at != -1:
                row.text = row.text[:at]
                return self._finish(i, row, "stop")
        if len(row.tokens) >= row.params.max_tokens:
            return self._finish(i, row, "length")
        # hold back what could still become a stop string or an incomplete UTF-8 character
        hold = max((len(s) - 1 for s in row.params.stop), default=0)
        safe = len(row.text) - hold
        while safe > row.emitted and row.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > row.emitted:
            delta, row.emitted = row.text[row.emitted : safe], safe
            return TokenEvent(i, delta)
        return None

    def _finish(self, i: int, row: _Row, reason: FinishReason) -> TokenEvent:
        row.finish_reason = reason
        delta, row.emitted = row.text[row.emitted :], len(row.text)
        return TokenEvent(i, delta, reason)
