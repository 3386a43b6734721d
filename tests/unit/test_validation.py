"""Validation: every bad adapter is refused with a message that names the problem (a table, as vLLM does)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotswap.adapters import model_spec_for
from hotswap.errors import AdapterValidationError
from hotswap.store import AdapterFetcher
from hotswap.validation import validate_adapter

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V0 = "base_model.model.model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def spec(base_settings, tiny_base):
    return model_spec_for(base_settings)


@pytest.fixture(scope="module")
def good(make_adapter) -> Path:
    return make_adapter("valid-r8", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=11)


def _load(good: Path):
    from safetensors.torch import load_file

    return json.loads((good / "adapter_config.json").read_text()), load_file(str(good / "adapter_model.safetensors"))


def _write(folder: Path, config, tensors) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (folder / "adapter_config.json").write_bytes(raw)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _patch_config(**changes):
    def mutate(config, tensors):
        config.update(changes)
        return config, tensors

    return mutate


def _with_rank(r):
    def mutate(config, tensors):
        config["r"] = r
        for key in list(tensors):
            t = tensors[key]
            tensors[key] = torch.randn(r, t.shape[1]) if ".lora_A." in key else torch.randn(t.shape[0], r)
        return config, tensors

    return mutate


def _tensor(key, value):
    def mutate(config, tensors):
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
        return config, tensors

    return mutate


def _nan(config, tensors):
    tensors[f"{Q0}.lora_B.weight"][0, 0] = float("nan")
    tensors[f"{V0}.lora_A.weight"][1, 1] = float("inf")
    return config, tensors


def _raw_config(raw: bytes):
    def mutate(config, tensors):
        return raw, tensors

    return mutate


# (id, mutation of (config, tensors), substring the message must contain)
CONFIG_CASES = [
    ("not-lora", _patch_config(peft_type="IA3"), "only LoRA adapters"),
    ("dora", _patch_config(use_dora=True), "DoRA"),
    ("modules-to-save", _patch_config(modules_to_save=["lm_head"]), "modules_to_save"),
    ("rank-pattern", _patch_config(rank_pattern={"q_proj": 4}), "rank_pattern"),
    ("alpha-pattern", _patch_config(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
    ("rank-over-max", _with_rank(32), "exceeds max_rank=16"),
    ("embedding-target", _patch_config(target_modules=["q_proj", "v_proj", "embed_tokens"]), "embedding"),
    ("unprepared-target", _patch_config(target_modules=["q_proj", "v_proj", "dense"]), "not prepared on the replicas"),
    ("auto-mapping-code", _patch_config(auto_mapping={"base_model_class": "X", "parent_library": "evil.mod"}),
     "auto_mapping"),
    ("megatron", _patch_config(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
    ("megatron-core", _patch_config(megatron_core="os"), "megatron_core"),
    ("tokenizer-kwargs", _patch_config(tokenizer_kwargs={"trust_remote_code": True}), "reaches code"),
    ("trust-remote-code", _patch_config(trust_remote_code=True), "reaches code"),
    ("unknown-field", _patch_config(frobnicate=1), "unknown field 'frobnicate'"),
    ("bad-json", _raw_config(b'{"r": 8,'), "not valid JSON"),
    ("json-not-object", _raw_config(b"[1, 2]"), "must hold a JSON object"),
    ("alpha-negative", _patch_config(lora_alpha=-1), "lora_alpha must be a positive"),
    ("r-not-int", _patch_config(r="8"), "r must be a positive integer"),
    ("dropout-out-of-range", _patch_config(lora_dropout=1.5), "lora_dropout"),
    ("fan-in-fan-out", _patch_config(fan_in_fan_out=True), "fan_in_fan_out"),
    ("bias", _patch_config(bias="all"), "bias"),
    ("lora-bias", _patch_config(lora_bias=True), "lora_bias"),
    ("r-mismatch", _patch_config(r=4), "have rank [8] but adapter_config.json says r=4"),
    ("targets-not-listed", _patch_config(target_modules=["q_proj"]), "does not list"),
]

TENSOR_CASES = [
    ("nan-inf", _nan, "NaN/Inf"),
    ("wrong-in-features", _tensor(f"{Q0}.lora_A.weight", torch.randn(8, 48)), "in_features=64"),
    ("wrong-out-features", _tensor(f"{V0}.lora_B.weight", torch.randn(64, 8)), "out_features=32"),
    ("not-a-lora-key", _tensor(f"{Q0}.weight", torch.randn(64, 64)), "not a LoRA weight"),
    ("dora-magnitude", _tensor(f"{Q0}.lora_magnitude_vector", torch.randn(64)), "not a LoRA weight"),
    ("unknown-module", _tensor("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", torch.randn(8, 64)),
     "not a LoRA layer of the replicas"),
    ("embedding-key", _tensor("base_model.model.model.embed_tokens.lora_A.weight", torch.randn(8, 259)),
     "embedding/output layer"),
    ("missing-lora-b", _tensor(f"{Q0}.lora_B.weight", None), "has no lora_B.weight"),
    ("int-dtype", _tensor(f"{Q0}.lora_A.weight", torch.ones(8, 64, dtype=torch.int32)), "dtype 'I32'"),
    ("float64", _tensor(f"{Q0}.lora_A.weight", torch.ones(8, 64, dtype=torch.float64)), "dtype 'F64'"),
    ("one-dim", _tensor(f"{Q0}.lora_A.weight", torch.ones(8)), "expected a matrix"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CONFIG_CASES + TENSOR_CASES],
                         ids=[c[0] for c in CONFIG_CASES + TENSOR_CASES])
def test_bad_adapter_is_rejected_with_its_reason(tmp_path, good, spec, base_settings, mutate, expected):
    config, tensors = mutate(*_load(good))
    folder = base_settings.store_root / "bad" / tmp_path.name
    _write(folder, config, tensors)
    fetched = AdapterFetcher.from_settings(base_settings).fetch(str(folder))
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(fetched, spec)
    assert expected in str(info.value), str(info.value)
    assert str(folder) in str(info.value)  # the message names the adapter
    assert all(p in str(info.value) for p in info.value.problems)


def _raw_weights(good: Path, folder: Path, edit) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good / "adapter_config.json", folder / "adapter_config.json")
    raw = (good / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(edit(raw))


def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


FILE_CASES = [
    ("header-length-bomb", lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "over the"),
    ("header-longer-than-file", lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "truncated or corrupt"),
    ("truncated-data", lambda raw: raw[: len(raw) - 100], "outside the"),
    ("truncated-to-nothing", lambda raw: raw[:5], "too short"),
    ("header-bit-flip", lambda raw: raw[:8] + raw[8:9].replace(b"{", b"[") + raw[9:], "header"),
    ("header-garbage", lambda raw: raw[:8] + b"\xff" * _header_len(raw) + raw[8 + _header_len(raw):], "not valid JSON"),
    ("trailing-bytes", lambda raw: raw + b"\x00" * 16, "trailing bytes"),
    ("no-tensors", lambda raw: struct.pack("<Q", 2) + b"{}", "holds no tensors"),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_corrupt_safetensors_is_rejected_before_loading(tmp_path, good, spec, base_settings, edit, expected):
    folder = base_settings.store_root / "corrupt" / tmp_path.name
    _raw_weights(good, folder, edit)
    fetched = AdapterFetcher.from_settings(base_settings).fetch(str(folder))
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(fetched, spec)
    assert expected in str(info.value), str(info.value)


def test_size_cap_applies_to_the_file(tmp_path, good, spec, base_settings):
    fetched = AdapterFetcher.from_settings(base_settings).fetch(str(good))
    with pytest.raises(AdapterValidationError, match="over max_adapter_bytes=100"):
        validate_adapter(fetched, spec, max_adapter_bytes=100)


def test_header_cap(good, spec, base_settings):
    fetched = AdapterFetcher.from_settings(base_settings).fetch(str(good))
    with pytest.raises(AdapterValidationError, match="over the 64-byte cap"):
        validate_adapter(fetched, spec, max_header_bytes=64)


def test_every_problem_is_listed_in_one_error(tmp_path, good, spec, base_settings):
    config, tensors = _load(good)
    config.update(use_dora=True, rank_pattern={"q_proj": 2}, frobnicate=1, r=64)
    tensors[f"{Q0}.lora_A.weight"][0, 0] = float("nan")
    folder = base_settings.store_root / "many" / tmp_path.name
    _write(folder, config, tensors)
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter(AdapterFetcher.from_settings(base_settings).fetch(str(folder)), spec)
    problems = info.value.problems
    for needle in ("DoRA", "rank_pattern", "frobnicate", "exceeds max_rank"):
        assert any(needle in p for p in problems), problems
    assert len(problems) >= 4
    assert str(info.value).count("\n") == 0  # one line


def test_valid_adapter_passes_and_is_loaded(good, spec, base_settings):
    fetched = AdapterFetcher.from_settings(base_settings).fetch(str(good))
    validated = validate_adapter(fetched, spec)
    assert validated.rank == 8 and validated.lora_alpha == 16 and validated.scaling == 2.0
    assert validated.target_modules == ("q_proj", "v_proj")
    assert len(validated.tensors) == 4  # 2 layers x (q_proj, v_proj)
    assert validated.sha256 == fetched.sha256 and len(validated.sha256) == 64


def test_peft_written_auto_mapping_is_accepted(good):
    config, _ = _load(good)
    # what PEFT itself writes: accepted, never imported
    assert config["auto_mapping"]["parent_library"].startswith("transformers.")


def test_regex_target_modules(tmp_path, good, spec, base_settings):
    config, tensors = _load(good)
    config["target_modules"] = r".*\.(q_proj|v_proj)"
    folder = base_settings.store_root / "regex" / tmp_path.name
    _write(folder, config, tensors)
    validate_adapter(AdapterFetcher.from_settings(base_settings).fetch(str(folder)), spec)
    config["target_modules"] = r".*\.nothing"
    _write(folder, config, tensors)
    with pytest.raises(AdapterValidationError, match="matches no LoRA layer"):
        validate_adapter(AdapterFetcher.from_settings(base_settings).fetch(str(folder)), spec)


def test_spec_from_config_matches_spec_from_prepared_model(base_settings, tiny_base, spec):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hotswap.validation import ModelSpec

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=16, target_modules=list(base_settings.target_modules)),
    )
    assert ModelSpec.from_peft_model(model, max_rank=16).fingerprint == spec.fingerprint
    assert len(spec.layers) == 2 * 7
