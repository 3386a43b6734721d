"""The bad-adapter corpus: every way an adapter can be broken or hostile, each with the words its error must
contain. The unit tests run each case through validation; the integration tests roll each one through a
running controller and check that nothing moved.

``write_corpus(good, root)`` writes every case as an adapter folder under ``root``; cases that need the
local store itself (escapes, symlinks, pickle-only, missing files) are built relative to the store root.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V0 = "base_model.model.model.layers.0.self_attn.v_proj"

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
    # found by the hypothesis fuzzing: a non-string entry once raised TypeError instead of a validation error
    ("targets-nested-list", _patch_config(target_modules=[["q_proj"]]), "must be a non-empty list of module names"),
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
    # found by the hypothesis fuzzing: a non-string dtype once raised TypeError instead of a validation error
    ("dtype-not-a-string", lambda raw: _edit_header(raw, lambda h: next(
        e for k, e in h.items() if k != "__metadata__").update(dtype=["F32"])), "has dtype ['F32']"),
    # found by the hypothesis fuzzing: a null shape once reached the key checks and raised TypeError
    ("shape-null", lambda raw: _edit_header(raw, lambda h: next(
        e for k, e in h.items() if k != "__metadata__").update(shape=None)), "has an invalid shape None"),
]

def _edit_header(raw: bytes, edit) -> bytes:
    """Rewrite the JSON header of safetensors bytes with ``edit(header)`` (in place), keeping the data."""
    n = _header_len(raw)
    header = json.loads(raw[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:]


# cases the store refuses before validation: (id, build(good, store_root, name) -> URI, words of the error)
def _pickle_only(good: Path, root: Path, name: str) -> str:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle, never read")
    return name


def _missing(file: str):
    def build(good: Path, root: Path, name: str) -> str:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if f != file:
                shutil.copy(good / f, folder)
        return name

    return build


def _outside(root: Path) -> Path:
    """A folder outside the store root (``root`` is ``<store root>/corpus``)."""
    out = root.parent.parent / "outside-the-store"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _symlinked_folder(good: Path, root: Path, name: str) -> str:
    outside = _outside(root) / name
    if not outside.exists():
        shutil.copytree(good, outside)
    link = root / name
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    return name


def _symlinked_weights(good: Path, root: Path, name: str) -> str:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good / "adapter_config.json", folder)
    secret = _outside(root) / f"secret-{name}.safetensors"
    shutil.copy(good / "adapter_model.safetensors", secret)
    if not (folder / "adapter_model.safetensors").is_symlink():
        (folder / "adapter_model.safetensors").symlink_to(secret)
    return name


def _huge(good: Path, root: Path, name: str) -> str:
    """Weights over a 4 MiB cap (a sparse file: its size is what is checked, before any byte is read)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(good / "adapter_config.json", folder)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write((good / "adapter_model.safetensors").read_bytes())
        f.truncate(HUGE_CAP_BYTES + 1)
    return name


HUGE_CAP_BYTES = 4 << 20

STORE_CASES = [
    ("pickle-only", _pickle_only, "pickle"),
    ("missing-config", _missing("adapter_config.json"), "adapter_config.json"),
    ("missing-weights", _missing("adapter_model.safetensors"), "adapter_model.safetensors"),
    ("dotdot-escape", lambda good, root, name: f"{name}/../../outside", "contains '..'"),
    ("absolute-outside-root", lambda good, root, name: "/etc", "outside the local store root"),
    ("symlinked-folder", _symlinked_folder, "outside the local store root"),
    ("symlinked-weights", _symlinked_weights, "symlink"),
    ("over-size-cap", _huge, f"max_adapter_bytes={HUGE_CAP_BYTES}"),
]


def write_corpus(good: Path, root: Path) -> list[tuple[str, str, str]]:
    """Write every case under ``root`` (a local store root); return ``(id, uri, expected words)`` per case.

    ``over-size-cap`` needs ``max_adapter_bytes = HUGE_CAP_BYTES`` in the settings that read it.
    """
    out = []
    for case_id, mutate, expected in CONFIG_CASES + TENSOR_CASES:
        folder = root / "corpus" / case_id
        if not folder.exists():
            config, tensors = mutate(*_load(good))
            _write(folder, config, tensors)
        out.append((case_id, f"corpus/{case_id}", expected))
    for case_id, edit, expected in FILE_CASES:
        folder = root / "corpus" / case_id
        if not folder.exists():
            _raw_weights(good, folder, edit)
        out.append((case_id, f"corpus/{case_id}", expected))
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    for case_id, build, expected in STORE_CASES:
        uri = build(good, root / "corpus", case_id)  # relative to root/corpus, or absolute
        out.append((case_id, uri if uri.startswith("/") else f"corpus/{uri}", expected))
    return out
