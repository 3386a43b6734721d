"""The built-in tiny base model and demo adapter, generated offline and deterministically.

``builtin:tiny-llama`` is a Llama-shaped causal LM (hidden 64, 2 layers) with a byte-level
tokenizer built with the ``tokenizers`` library. It is generated from a fixed seed on first
use, saved with ``save_pretrained`` into the cache and loaded back through the normal
``AutoModelForCausalLM`` / ``AutoTokenizer`` path, so the real loading code always runs.
Its tokenizer carries a small chat template (:data:`TINY_CHAT_TEMPLATE`, saved as
``chat_template.jinja``), so ``/v1/chat/completions`` works on it as on a real chat model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hotswap.errors import ConfigError

__all__ = [
    "BUILTIN_DEMO_ADAPTER",
    "BUILTIN_PREFIX",
    "TINY_CHAT_TEMPLATE",
    "materialize_builtin_model",
    "materialize_demo_adapter",
    "resolve_base_model",
    "write_random_adapter",
]

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_DEMO_ADAPTER = "builtin:demo"
_BUILTIN_MODELS = ("tiny-llama",)
# bump when the generated files change, so an old cache is not reused: the version names the cache
# directory, and a cache written by an older version is left alone and generated again beside it
# (v2: the tokenizer gained TINY_CHAT_TEMPLATE; the weights are the same)
_FORMAT_VERSION = "v2"
_SEED = 20261123

# Zephyr-style turns: a role tag line, the content, then the end-of-sequence token the model stops on.
# Rendered with ``add_generation_prompt=True`` it ends in the assistant's tag, where the reply starts.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def resolve_base_model(base_model: str, *, cache_dir: Path) -> str:
    """Return what ``from_pretrained`` should load for ``base_model``.

    ``builtin:NAME`` is generated into ``cache_dir`` on first use; an existing directory is
    returned as is; anything else is taken as a Hugging Face model id.
    """
    if base_model.startswith(BUILTIN_PREFIX):
        return str(materialize_builtin_model(base_model.removeprefix(BUILTIN_PREFIX), cache_dir=cache_dir))
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"base_model {base_model!r} is a path but holds no config.json; point it at a directory "
                "written by save_pretrained (model and tokenizer), or use 'builtin:tiny-llama'"
            )
        return str(path)
    return base_model


def materialize_builtin_model(name: str, *, cache_dir: Path) -> Path:
    """Generate the built-in model ``name`` into ``cache_dir`` once and return its directory.

    Safe to call from several processes at once: each builds in a private temporary
    directory and the first atomic rename wins.
    """
    if name not in _BUILTIN_MODELS:
        raise ConfigError(f"unknown built-in model 'builtin:{name}'; built-in models: {', '.join(_BUILTIN_MODELS)}")
    target = Path(cache_dir) / "models" / f"{name}-{_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("generating built-in model builtin:%s into %s", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        build = Path(tmp) / "model"
        _build_tiny_llama(build)
        _publish_dir(build, target)
    return target


def materialize_demo_adapter(*, base_model_dir: Path, store_root: Path, name: str = "demo/v1") -> Path:
    """Write the deterministic demo adapter for the built-in model under ``store_root`` once."""
    target = Path(store_root) / name
    if (target / "adapter_model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".demo-") as tmp:
        build = Path(tmp) / "adapter"
        write_random_adapter(base_model_dir, build, r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=1)
        _publish_dir(build, target)
    logger.info("generated demo adapter at %s", target)
    return target


def write_random_adapter(
    base_model_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    seed: int,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
) -> Path:
    """Save a LoRA adapter with random (non-zero) A and B in PEFT's ``save_pretrained`` layout.

    Deterministic for a given seed; used for the demo adapter, tests and benchmarks.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        init_lora_weights=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        # nn.Linear's default init gives B the same scale as A: outputs move visibly, as a real adapter's do
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                    module.lora_B["default"].weight.mul_(0.5)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def _publish_dir(build: Path, target: Path) -> None:
    """Atomically move ``build`` to ``target``; if another process won the race keep theirs."""
    try:
        os.rename(build, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(build, ignore_errors=True)


def _build_tiny_llama(out_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    # Byte-level BPE without merges: every byte is a token, so any prompt encodes and it is
    # deterministic by construction (no training step).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
