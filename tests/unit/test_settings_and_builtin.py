"""Settings validation, the built-in model's determinism, and errors that survive pickling (Ray ships them)."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from hotswap.builtin import materialize_builtin_model, resolve_base_model
from hotswap.errors import AdapterFetchError, AdapterNotFoundError, AdapterValidationError, ConfigError
from hotswap.settings import HotswapSettings


def test_defaults_are_valid():
    settings = HotswapSettings.from_args({})
    assert settings.base_model == "builtin:tiny-llama" and settings.compile is True
    assert settings.store_root == settings.cache_dir / "adapters"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_rnak": 8}, "unknown key 'max_rnak'"),
        ({"max_rank": 0}, "'max_rank'"),
        ({"compile": "sometimes"}, "'compile'"),
        ({"target_modules": "q_proj"}, "list of module names"),
        ({"prefill_chunk_tokens": 512, "max_seq_len": 64}, "must not exceed max_seq_len"),
        ({"compile_mode": "reduce-overhead", "device": "cpu"}, "CUDA graphs"),
        ({"dtype": "float8"}, "'dtype'"),
        ({"compile_wrapper": "c++"}, "compile_wrapper"),
    ],
)
def test_bad_settings_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        HotswapSettings.from_args(args)


def test_builtin_model_is_deterministic(tmp_path, tiny_base):
    other = materialize_builtin_model("tiny-llama", cache_dir=tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert hashlib.sha256((other / name).read_bytes()).digest() == hashlib.sha256(
            (tiny_base / name).read_bytes()
        ).digest(), name


def test_builtin_model_loads_through_auto_classes(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    text = "héllo, wörld ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_base_model_resolution(tmp_path, tiny_base, hotswap_home):
    assert resolve_base_model("builtin:tiny-llama", cache_dir=hotswap_home) == str(tiny_base)
    assert resolve_base_model(str(tiny_base), cache_dir=hotswap_home) == str(tiny_base)
    assert resolve_base_model("org/some-model", cache_dir=hotswap_home) == "org/some-model"  # a hub id
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_base_model(str(tmp_path), cache_dir=hotswap_home)
    with pytest.raises(ConfigError, match="unknown built-in model"):
        resolve_base_model("builtin:huge", cache_dir=hotswap_home)


@pytest.mark.parametrize(
    "error",
    [
        AdapterValidationError("s3://b/a", ["one", "two"]),
        AdapterNotFoundError("gone", uri="s3://b/a"),
        AdapterFetchError("down", uri="s3://b/a"),
    ],
)
def test_errors_survive_pickling(error):
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error) and clone.uri == "s3://b/a"
    if isinstance(error, AdapterValidationError):
        assert clone.problems == ["one", "two"]
    assert isinstance(clone, (ValueError, OSError))
