"""The per-row pieces of generation: request checks, the per-row KV cache, sampling and incremental text.

The scheduler (:mod:`hotswap.scheduler`) runs every forward call in one of two shapes, a
prefill chunk ``(max_batch_size, prefill_chunk_tokens)`` (which also carries the generating rows'
tokens, one each in its last column) or a decode step ``(max_batch_size, 1)``, so a compiled model
never compiles again after warm-up. Rows join and leave between
steps, so each row keeps its own positions: in :class:`RowCache` a token at position ``p`` of
a row is stored in cache slot ``p`` of that row, and every write of a step goes to a per-row
slot index (padding and rows that sit a step out write to a scratch region at the end that no
query reads). A query at position ``p`` attends to slots ``0..p`` of its own row, which are
exactly that row's tokens, so a row that joins late needs no reset and its positions and cache
do not depend on the other rows (its numerics can: a generating row's token comes from whichever
shape the step has, which depends on whether another row is reading its prompt).
(``torch.compile(model).generate`` would run the uncompiled forward; the scheduler calls the
compiled module directly.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from hotswap.errors import RequestError
from hotswap.versions import AdapterVersion

__all__ = ["Completion", "IncrementalText", "RequestChecker", "RowCache", "SamplingParams", "TokenEvent",
           "choose_tokens"]

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
    version: AdapterVersion | None = None  # the adapter version every token came from

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenEvent:
    """Progress of one request: new text (possibly empty), and the finish reason once it is done."""

    row: int
    delta: str
    finish_reason: FinishReason | None = None


class RequestChecker:
    """Tokenizes prompts and refuses requests that cannot be served within the window."""

    MAX_STOPS, MAX_STOP_CHARS = 4, 256  # what the HTTP API allows; each stop costs time on every token

    def __init__(self, tokenizer, *, max_seq_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids for a prompt (text is tokenized with the tokenizer's special tokens)."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ('\ud800') crashes the tokenizer with a TypeError
                raise RequestError(f"prompt is not valid unicode ({e.reason} at character {e.start}); "
                                   "send UTF-8 text") from None
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                        or not 0 <= t < self.vocab_size), None)
            if bad is not None:  # it would fail the whole batch's step, not just this request
                raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad!r}")
        else:
            raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise RequestError("prompt is empty after tokenization; send at least one character")
        return ids

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise :class:`RequestError` if a request cannot be served within the window."""
        for name, kinds, what in (("max_tokens", int, "an integer"), ("temperature", (int, float), "a number"),
                                  ("top_p", (int, float), "a number")):
            value = getattr(params, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise RequestError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
        if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
            raise RequestError(f"seed must be an integer, got {type(params.seed).__name__} {params.seed!r}")
        if not isinstance(params.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {type(params.ignore_eos).__name__} "
                               f"{params.ignore_eos!r}")
        if not all(isinstance(s, str) for s in params.stop):
            raise RequestError(f"stop must be strings, got {params.stop!r}")
        if any(not s for s in params.stop):  # it would match everywhere: the answer would be cut to nothing
            raise RequestError(f"stop strings must not be empty, got {params.stop!r}; leave the empty one out")
        if len(params.stop) > self.MAX_STOPS or any(len(s) > self.MAX_STOP_CHARS for s in params.stop):
            raise RequestError(f"stop takes up to {self.MAX_STOPS} strings of up to {self.MAX_STOP_CHARS} "
                               f"characters, got {len(params.stop)}")
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
        if params.seed is not None and not 0 <= params.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2**63), got {params.seed}")


class RowCache:
    """A static KV cache whose writes go to a per-row slot index (``(batch, cache_len)`` per layer).

    ``cache_len`` is ``max_seq_len + chunk``: positions ``0..max_seq_len-1`` plus ``chunk`` scratch
    slots. Before each forward the scheduler writes the step's slot index into :attr:`index`
    (prefill) or :attr:`decode_index` in place; the tensors keep their identity, so the compiled
    graphs see the same inputs every step.
    """

    def __init__(self, config, *, batch_size: int, chunk: int, max_seq_len: int, device, dtype) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.cache_len = max_seq_len + chunk
        self.scratch = max_seq_len
        self.prefill_index = torch.zeros((batch_size, chunk), dtype=torch.long, device=device)
        # with chunk 1 both steps have one shape, so the layer cannot tell them apart: one index for both
        self.decode_index = (self.prefill_index if chunk == 1 else
                             torch.zeros((batch_size, 1), dtype=torch.long, device=device))
        chunk_len = chunk

        class _RowLayer(StaticLayer):
            """StaticLayer whose update scatters each row's keys to its own slots."""

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                q = key_states.shape[-2]
                index = owner.decode_index if q == 1 and chunk_len != 1 else owner.prefill_index
                index = index[:, None, :, None]
                self.keys.scatter_(2, index.expand(-1, key_states.shape[1], -1, key_states.shape[-1]), key_states)
                self.values.scatter_(2, index.expand(-1, value_states.shape[1], -1, value_states.shape[-1]),
                                     value_states)
                return self.keys, self.values

        owner = self
        self.cache = StaticCache(config=config, max_cache_len=self.cache_len)
        for layer in self.cache.layers:
            if type(layer) is not StaticLayer:
                raise TypeError(f"the base model's cache layers are {type(layer).__name__}; hotswap's scheduler "
                                "supports full-attention models (StaticLayer) only")
            layer.__class__ = _RowLayer
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(
            batch_size=batch_size, num_heads=config.num_key_value_heads, head_dim=head_dim, dtype=dtype,
            device=device,
        )


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams | None],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """One next token per row of ``logits`` (float32); rows whose params are ``None`` get the greedy token."""
    greedy = logits.argmax(dim=-1).tolist()
    chosen = []
    for i, p in enumerate(params):
        if p is None or p.temperature == 0:
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
        chosen.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return chosen


@dataclass
class IncrementalText:
    """A completion's text, decoded incrementally: each token decodes a short window, never the whole text.

    The window starts a few tokens back (``prefix``) so that tokenizers whose decoders strip or
    merge at the start of a sequence decode the new tokens the same way as in the full text;
    text that ends in an incomplete UTF-8 character (``\\ufffd``) waits for the next token.
    What could still become a stop string is held back, never sent and then taken back.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False  # a stop string cut the text (in ``add``, or in ``finish`` at the last token)
    _prefix: int = 0
    _read: int = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append ``token``; return the text that may be sent now and whether a stop string ended it."""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            if self._cut(searched_from):
                return self.flush(), True
        hold = max((len(s) - 1 for s in self.stop if s), default=0)  # "" never matches (``_cut``): holds nothing
        safe = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta, False

    def finish(self) -> str:
        """The rest of the text, including an incomplete character at the end; call once, at the end."""
        decode = self.tokenizer.decode
        if self._read < len(self.tokens):
            before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
            after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
            self.text += after[len(before):]
            self._read = len(self.tokens)
            self._cut(0)
        return self.flush()

    def _cut(self, searched_from: int) -> bool:
        """Cut the text at the earliest stop string found at or after ``searched_from``; whether one was."""
        found = [at for stop in self.stop if stop and (at := self.text.find(stop, searched_from)) != -1]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
        return bool(found)

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
