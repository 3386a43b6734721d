"""Chat prompts: OpenAI-style messages rendered into one prompt string with the base model's chat template.

The ingress renders a chat request here and sends the resulting prompt to the replicas' ordinary
completion path, so chat and completions share generation, batching, adapters and errors. The
template is the base model's own (``tokenizer.chat_template``, saved by ``save_pretrained`` as
``chat_template.jinja``); a base model without one cannot take messages, and the request is refused
with a :class:`~hotswap.errors.RequestError` that says to use ``/v1/completions`` or a model with a
template. Only the tokenizer is loaded, not the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from hotswap.errors import RequestError
from hotswap.settings import HotswapSettings

__all__ = ["ChatRenderer"]

logger = logging.getLogger(__name__)


class ChatRenderer:
    """Turns ``[{"role", "content"}, ...]`` into the prompt the base model was trained to continue; thread-safe.

    Args:
        tokenizer: a ``transformers`` tokenizer, the same the replicas encode prompts with.
        base_model: the ``base_model`` setting, named in errors.
    """

    def __init__(self, tokenizer, *, base_model: str) -> None:
        self.tokenizer = tokenizer
        self.base_model = base_model
        # a fast tokenizer sets its truncation state on every call, and two threads doing so at once fail
        # ("Already borrowed"); callers render from a thread pool
        self._lock = threading.Lock()
        # Replicas encode a prompt with the tokenizer's special tokens. A tokenizer that adds a BOS itself,
        # given a template that writes one too, would start the prompt with two: drop the template's.
        bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
        added = tokenizer("x")["input_ids"]
        self._leading_bos = bos if bos and bos_id is not None and added[:1] == [bos_id] else None

    @classmethod
    def load(cls, settings: HotswapSettings) -> ChatRenderer:
        """Load the tokenizer of ``settings.base_model`` (resolved as the replicas resolve it; no model weights)."""
        from transformers import AutoTokenizer

        from hotswap.builtin import resolve_base_model

        path = resolve_base_model(settings.base_model, cache_dir=settings.cache_dir)
        renderer = cls(AutoTokenizer.from_pretrained(path), base_model=settings.base_model)
        logger.info("chat: loaded the tokenizer of %s (chat template: %s)", settings.base_model,
                    "yes" if renderer.has_template else "none")
        return renderer

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt for ``messages`` (each ``{"role": ..., "content": str}``), ending where the assistant replies.

        Raises:
            RequestError: the base model has no chat template, its template refused the messages
                (templates may raise, e.g. when roles do not alternate), or the text is not valid unicode.
        """
        if not self.has_template:
            raise RequestError(
                f"base model {self.base_model!r} has no chat template (its tokenizer has no chat_template), so "
                "/v1/chat/completions cannot turn messages into a prompt; send the text as 'prompt' to "
                "/v1/completions, or serve a base model whose tokenizer has a chat template (set "
                "tokenizer.chat_template and save_pretrained, which writes chat_template.jinja)"
            )
        from jinja2 import TemplateError

        try:
            with self._lock:
                prompt = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                            add_generation_prompt=True)
        except TemplateError as e:
            raise RequestError(f"the chat template of base model {self.base_model!r} refused the messages: {e}; "
                               "change the messages to what this template accepts") from None
        if self._leading_bos and prompt.startswith(self._leading_bos):
            prompt = prompt[len(self._leading_bos):]
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ('\ud800') would crash the tokenizer with a TypeError
            raise RequestError(f"the messages are not valid unicode ({e.reason}); send UTF-8 text") from None
        return prompt

    def count_tokens(self, prompt: str) -> int:
        """How many tokens a replica will encode ``prompt`` into."""
        with self._lock:
            return len(self.tokenizer(prompt)["input_ids"])
