"""Property-based fuzzing (hypothesis) of ``adapter_config.json`` and of safetensors headers: whatever arrives,
only the project's own adapter errors come out, never another exception; and whatever passes validation
also stages (so it could be swapped) without an error."""

from __future__ import annotations

import json
import struct
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hotswap.errors import AdapterError
from hotswap.staging import stage_adapter
from hotswap.store import AdapterFetcher
from hotswap.validation import validate_adapter
from tests.fuzzing import fuzz_settings

pytestmark = pytest.mark.slow

FUZZ = fuzz_settings(200)

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
               "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "fan_in_fan_out",
               "init_lora_weights", "layers_to_transform", "layers_pattern", "auto_mapping", "base_model_name_or_path",
               "revision", "megatron_config", "megatron_core", "inference_mode", "lora_bias", "exclude_modules",
               "trust_remote_code", "tokenizer_kwargs", "frobnicate"]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]


_OUTCOMES = {"adapter_config.json": Counter(), "safetensors header": Counter()}


@pytest.fixture(scope="module", autouse=True)
def _report(reliability):
    yield
    for what, outcomes in _OUTCOMES.items():
        if outcomes:
            reliability.record(
                f"fuzzed {what} (hypothesis)", inputs=sum(outcomes.values()),
                held=f"only the project's adapter errors came out ({outcomes['refused']} refused with a message, "
                     f"{outcomes['passed']} valid and staged); no other exception")


@pytest.fixture(scope="module")
def good(make_adapter) -> Path:
    return make_adapter("fuzz-r8", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=61)


def _check(folder: Path, base_settings, spec, fuzzed: str | None = None) -> str:
    """Fetch and validate ``folder``; "refused" for a project error, "passed" when it validated and staged."""
    try:
        validated = validate_adapter(AdapterFetcher.from_settings(base_settings).fetch(str(folder)), spec,
                                     max_adapter_bytes=1 << 20, max_header_bytes=1 << 16)
        stage_adapter(validated, spec, dtype=torch.float32)
        outcome = "passed"
    except AdapterError as e:
        assert str(e)  # every refusal says why
        outcome = "refused"
    if fuzzed:
        _OUTCOMES[fuzzed][outcome] += 1
    return outcome


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), _JSON, max_size=5),
       dropped=st.lists(st.sampled_from(CONFIG_KEYS), max_size=3), as_bytes=st.none() | st.binary(max_size=64))
def test_fuzzed_adapter_config_gives_only_adapter_errors(good, base_settings, spec, changes, dropped, as_bytes):
    config = json.loads((good / "adapter_config.json").read_text())
    config.update(changes)
    for key in dropped:
        config.pop(key, None)
    folder = base_settings.store_root / "fuzz-config" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    raw = as_bytes if as_bytes is not None else json.dumps(config).encode()
    (folder / "adapter_config.json").write_bytes(raw)
    (folder / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    _check(folder, base_settings, spec, "adapter_config.json")


@st.composite
def _headers(draw, original: dict):
    header = {k: dict(v) if isinstance(v, dict) else v for k, v in original.items()}
    keys = [k for k in header if k != "__metadata__"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        entry = header[key]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | _JSON)
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4) | _JSON)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(min_value=-5, max_value=2**62), max_size=3) | _JSON)
        elif field == "drop":
            del header[key]
        else:
            entry[draw(st.text(max_size=8))] = draw(_JSON)
    if draw(st.booleans()):
        header[draw(st.text(max_size=40))] = draw(_JSON)
    if draw(st.booleans()):
        header["__metadata__"] = draw(_JSON)
    return header


@FUZZ
@given(data=st.data(), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -8, 2**40]))
def test_fuzzed_safetensors_header_gives_only_adapter_errors(good, base_settings, spec, data, length_delta):
    raw = (good / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = data.draw(_headers(json.loads(raw[8:8 + n])))
    encoded = json.dumps(header).encode()
    length = max(0, len(encoded) + length_delta)
    folder = base_settings.store_root / "fuzz-header" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", length) + encoded + raw[8 + n:])
    _check(folder, base_settings, spec, "safetensors header")


def test_the_fuzz_check_passes_a_good_adapter_and_refuses_a_bad_one(good, base_settings, spec, tmp_path):
    """Control: the check distinguishes (so the fuzz tests are not vacuous)."""
    assert _check(good, base_settings, spec) == "passed"
    folder = base_settings.store_root / "fuzz-control" / tmp_path.name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(b"{")
    (folder / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    assert _check(folder, base_settings, spec) == "refused"
