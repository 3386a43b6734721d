"""Validate an adapter once, before anything touches a model: collect every problem, raise once.

Order, cheapest first, nothing loaded until it is known to be safe:

1. ``adapter_config.json``: strict JSON, LoRA only, every field known, nothing that PEFT
   0.21.2's hotswap gets wrong (DoRA, ``modules_to_save``, ``rank_pattern``/``alpha_pattern``,
   embedding targets) and nothing that reaches code (``auto_mapping`` beyond PEFT's own
   record, ``megatron_*``, ``tokenizer_*``, ``trust_remote_code``).
2. The safetensors header, parsed by hand: size caps, dtypes, offsets, every key a LoRA
   layer of the prepared model with the right shapes and a rank <= ``max_rank``.
3. Only then the tensors: all finite.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hotswap.errors import AdapterValidationError
from hotswap.store import CONFIG_NAME, WEIGHTS_NAME, FetchedAdapter
from hotswap.versions import config_digest

__all__ = ["LoraLayerSpec", "ModelSpec", "ValidatedAdapter", "load_validated", "validate_adapter"]

_ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# Fields of peft 0.21.2's LoraConfig, by what hotswap does with them.
_INFORMATIONAL = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "layers_to_transform", "layers_pattern", "exclude_modules", "r", "lora_alpha", "lora_dropout",
    "use_rslora", "target_modules", "auto_mapping", "megatron_config", "megatron_core",
}
# only used to initialise weights for training: irrelevant to a trained adapter
_INIT_ONLY = {"init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
              "ensure_weight_tying"}
# a non-default value changes the forward in a way an in-place swap of A/B cannot reproduce
_MUST_BE_DEFAULT: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA cannot be hot-swapped by PEFT 0.21.2 (peft#3581); merge it or retrain as plain LoRA"),
    "modules_to_save": (None, "modules_to_save replaces whole modules, which an in-place LoRA swap cannot do"),
    "rank_pattern": ({}, "rank_pattern is not applied correctly by PEFT 0.21.2's hotswap (peft#3738); use one r"),
    "alpha_pattern": ({}, "alpha_pattern is not applied correctly by PEFT 0.21.2's hotswap (peft#3738); use one "
                          "lora_alpha"),
    "trainable_token_indices": (None, "trainable tokens change the embedding, which cannot be hot-swapped"),
    "layer_replication": (None, "layer_replication changes the model's structure"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not supported"),
    "lora_bias": (False, "lora_bias adds a bias to lora_B that the prepared replicas do not have"),
    "bias": ("none", "bias training changes base-model biases, which are not part of a swap"),
    "fan_in_fan_out": (False, "fan_in_fan_out is for Conv1D layers; the replicas carry LoRA on Linear layers"),
    "use_qalora": (False, "QALoRA is for quantized base layers, which the replicas do not use"),
    "use_bdlora": (None, "BD-LoRA changes the LoRA forward"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) changes the forward per token"),
    "arrow_config": (None, "Arrow routing changes the LoRA forward"),
    "kasa_config": (None, "KaSA changes the LoRA forward"),
    "velora_config": (None, "VeLoRA changes the LoRA forward"),
    "monteclora_config": (None, "MonteCLoRA changes the LoRA forward"),
}
_KNOWN_FIELDS = _INFORMATIONAL | _INIT_ONLY | set(_MUST_BE_DEFAULT)


@dataclass(frozen=True)
class LoraLayerSpec:
    """One LoRA-carrying Linear of the prepared model, named as in the PeftModel (``base_model.model....``)."""

    name: str
    in_features: int
    out_features: int

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelSpec:
    """What an adapter must fit: the LoRA layers every replica was prepared with, and ``max_rank``.

    Computed from the base model's config alone (:meth:`from_base_config`, on the meta
    device, no weights) or from a prepared PeftModel (:meth:`from_peft_model`); both give the
    same ``fingerprint``, which staged adapters carry so a replica can refuse a mismatch.
    """

    layers: tuple[LoraLayerSpec, ...]
    target_modules: frozenset[str]
    max_rank: int
    embedding_modules: frozenset[str] = field(default_factory=frozenset)

    @functools.cached_property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {"layers": [(x.name, x.in_features, x.out_features) for x in self.layers], "max_rank": self.max_rank},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def layer_index(self) -> dict[str, LoraLayerSpec]:
        return {layer.name: layer for layer in self.layers}

    @classmethod
    def from_base_config(cls, config: Any, *, target_modules: tuple[str, ...], max_rank: int) -> ModelSpec:
        """Enumerate the target Linear layers of a ``transformers`` config without loading weights."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls._from_modules(model.named_modules(), "base_model.model.", target_modules, max_rank)

    @classmethod
    def from_peft_model(cls, model: torch.nn.Module, *, max_rank: int) -> ModelSpec:
        """Read the LoRA layers of a prepared PeftModel."""
        from peft.tuners.lora import LoraLayer

        layers, targets, embeddings = [], set(), set()
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                layers.append(LoraLayerSpec(name, base.in_features, base.out_features))
                targets.add(name.rsplit(".", 1)[-1])
            elif isinstance(module, torch.nn.Embedding):
                embeddings.add(name.rsplit(".", 1)[-1])
        return cls(tuple(layers), frozenset(targets), max_rank, frozenset(embeddings))

    @classmethod
    def _from_modules(cls, named_modules, prefix, target_modules, max_rank) -> ModelSpec:
        layers, embeddings = [], set()
        wanted = set(target_modules)
        for name, module in named_modules:
            short = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and short in wanted:
                layers.append(LoraLayerSpec(prefix + name, module.in_features, module.out_features))
            elif isinstance(module, torch.nn.Embedding):
                embeddings.add(short)
        found = {x.short_name for x in layers}
        return cls(tuple(layers), frozenset(found), max_rank, frozenset(embeddings))


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check, with its tensors loaded (float, on CPU)."""

    uri: str
    sha256: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    target_modules: tuple[str, ...]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (lora_A, lora_B)
    size_bytes: int
    config_sha256: str = ""  # of adapter_config.json: part of the version's identity

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def record(self) -> dict:
        """What validation established, as JSON: enough for :func:`load_validated` to reload it."""
        return {"uri": self.uri, "sha256": self.sha256, "rank": self.rank, "lora_alpha": self.lora_alpha,
                "use_rslora": self.use_rslora, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "size_bytes": self.size_bytes,
                "config_sha256": self.config_sha256}


def validate_adapter(
    fetched: FetchedAdapter,
    spec: ModelSpec,
    *,
    max_adapter_bytes: int = 2 << 30,
    max_header_bytes: int = 16 << 20,
    serving_dtype: torch.dtype | None = None,
) -> ValidatedAdapter:
    """Check a fetched adapter against ``spec``; return it loaded, or raise ``AdapterValidationError``.

    ``serving_dtype``: the replicas' dtype when it is known (a setting); a weight beyond its range would
    become inf when staged.

    The error lists every problem found. Nothing here touches a model: call this once per
    adapter version (the controller does), then stage the result.
    """
    problems: list[str] = []
    config = _check_config(fetched.config_bytes, spec, problems)
    header = _check_header(fetched.weights_path, max_adapter_bytes, max_header_bytes, problems)
    rank = config.get("r") if isinstance(config.get("r"), int) else None
    modules = _check_keys(header, spec, config, rank, problems) if header is not None else {}
    if problems:
        raise AdapterValidationError(fetched.uri, problems)

    tensors = _load_finite(fetched.weights_path, modules, problems, serving_dtype)
    if problems:
        raise AdapterValidationError(fetched.uri, problems)
    covered = sorted({name.rsplit(".", 1)[-1] for name in tensors})
    return ValidatedAdapter(
        uri=fetched.uri,
        sha256=fetched.sha256,
        rank=config["r"],
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(covered),
        tensors=tensors,
        size_bytes=fetched.size_bytes,
        config_sha256=config_digest(fetched.config_bytes),
    )


def _remove_if_damaged(path: Path, digest: str, hashed: os.stat_result) -> None:
    """Remove a blob of the adapter cache (``blobs/<sha256>.safetensors``) whose bytes do not hash to its name, so
    that the next fetch downloads it again; only the very file that was hashed (a good blob put in its place
    meanwhile, by a concurrent download, stays), and never a file outside the cache."""
    if path.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{64}", path.stem) or digest == path.stem:
        return
    try:
        now = os.stat(path)
        if (now.st_ino, now.st_dev) == (hashed.st_ino, hashed.st_dev):
            path.unlink()
    except FileNotFoundError:
        pass


def cached_blob_intact(weights_path: Path, sha256: str) -> bool:
    """Whether a cached weights file still hashes to ``sha256``; a damaged blob (one that no longer hashes to its
    own name) is removed, so that the next fetch downloads it again."""
    digest = hashlib.sha256()
    with open(weights_path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        hashed = os.fstat(f.fileno())
    if digest.hexdigest() == sha256:
        return True
    _remove_if_damaged(Path(weights_path), digest.hexdigest(), hashed)
    return False


def load_validated(weights_path: Path, record: dict, spec: ModelSpec) -> ValidatedAdapter:
    """Reload an adapter that already passed :func:`validate_adapter` (``record`` is what it returned, as
    :meth:`ValidatedAdapter.record`), trusting that result: the file is identified by its sha256.

    For a restarted controller that must stage a version again without validating it again. A cached blob that
    no longer hashes to its own name (a damaged file) is removed before the error is raised.
    """
    from safetensors import safe_open

    if not cached_blob_intact(weights_path, record["sha256"]):
        raise AdapterValidationError(record["uri"], [f"cached weights no longer match sha256 {record['sha256']}"])
    layers = spec.layer_index()
    tensors = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            module = _KEY_RE.match(key)["module"]
            if module in layers and key.endswith("lora_A.weight"):
                tensors[module] = (f.get_tensor(key), f.get_tensor(f"{module}.lora_B.weight"))
    return ValidatedAdapter(
        uri=record["uri"], sha256=record["sha256"], rank=record["rank"], lora_alpha=record["lora_alpha"],
        use_rslora=record["use_rslora"], lora_dropout=record["lora_dropout"],
        target_modules=tuple(record["target_modules"]), tensors=dict(sorted(tensors.items())),
        size_bytes=weights_path.stat().st_size, config_sha256=record.get("config_sha256", ""),
    )


def _check_config(raw: bytes, spec: ModelSpec, problems: list[str]) -> dict:
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        problems.append(f"{CONFIG_NAME} is not UTF-8 ({e}); re-save it with save_pretrained")
        return {}
    except json.JSONDecodeError as e:
        problems.append(f"{CONFIG_NAME} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_NAME} must hold a JSON object, found {type(config).__name__}")
        return {}

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be hot-swapped")

    for key in sorted(config):
        if key == "trust_remote_code" or key.startswith("tokenizer_"):
            problems.append(f"field '{key}' reaches code and is never honoured; remove it from {CONFIG_NAME}")
        elif key not in _KNOWN_FIELDS:
            problems.append(f"unknown field '{key}' (not a peft 0.21.2 LoraConfig field); remove it or upgrade hotswap")

    _check_code_fields(config, problems)

    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, found {r!r}")
    elif r > spec.max_rank:
        problems.append(
            f"r={r} exceeds max_rank={spec.max_rank}: a larger rank would change tensor shapes and recompile; "
            f"retrain with r <= {spec.max_rank} or raise max_rank (restarts every replica)"
        )
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive finite number, found {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout must be a number in [0, 1), found {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"use_rslora must be true or false, found {config.get('use_rslora')!r}")

    for key, (default, why) in _MUST_BE_DEFAULT.items():
        value = config.get(key, default)
        # defaults are "none" or falsy (None, {}, False); any falsy spelling of "unset" is fine
        if (value != default) if isinstance(default, str) else bool(value):
            problems.append(f"{key}={value!r} is not supported: {why}")

    _check_targets(config.get("target_modules"), spec, problems)
    return config


def _check_code_fields(config: dict, problems: list[str]) -> None:
    auto = config.get("auto_mapping")
    # PEFT records {base_model_class, parent_library} here; hotswap never imports it, but anything
    # else (or a library outside transformers) is a request to run code and is refused.
    if auto is not None:
        ok = (
            isinstance(auto, dict)
            and set(auto) <= {"base_model_class", "parent_library"}
            and all(isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*", v) for v in auto.values())
            and str(auto.get("parent_library", "transformers.")).startswith("transformers.")
        )
        if not ok:
            problems.append(
                f"auto_mapping={auto!r} reaches code: only PEFT's own record of a transformers class is accepted; "
                "set it to null"
            )
    if config.get("megatron_config") is not None:
        problems.append("megatron_config is set: it makes PEFT import Megatron code; set it to null")
    if config.get("megatron_core", "megatron.core") not in ("megatron.core", None):
        problems.append(
            f"megatron_core={config['megatron_core']!r} names a module to import; set it to 'megatron.core'"
        )


def _check_targets(targets: Any, spec: ModelSpec, problems: list[str]) -> None:
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            problems.append(f"target_modules regex {targets!r} does not compile: {e}")
            return
        if not any(pattern.fullmatch(layer.name.removeprefix("base_model.model.")) for layer in spec.layers):
            problems.append(f"target_modules regex {targets!r} matches no LoRA layer of the replicas")
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(f"target_modules must be a non-empty list of module names, found {targets!r}")
        return
    embeddings = sorted(set(targets) & (spec.embedding_modules | {"lm_head"}))
    if embeddings:
        problems.append(
            f"target_modules includes embedding/output layers {embeddings}: embedding LoRA cannot be hot-swapped "
            "(peft#3581); train LoRA on the Linear projections only"
        )
    extra = sorted(set(targets) - spec.target_modules - set(embeddings))
    if extra:
        problems.append(
            f"target_modules {extra} are not prepared on the replicas (prepared: {sorted(spec.target_modules)}); "
            "add them to the service's target_modules (restarts replicas) or retrain without them"
        )


def _check_header(path: Path, max_bytes: int, max_header: int, problems: list[str]) -> dict | None:
    size = path.stat().st_size
    if size > max_bytes:
        problems.append(f"{WEIGHTS_NAME} is {size} bytes, over max_adapter_bytes={max_bytes}")
        return None
    if size < 8:
        problems.append(f"{WEIGHTS_NAME} is {size} bytes, too short to be safetensors (truncated upload?)")
        return None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > max_header:
            problems.append(f"{WEIGHTS_NAME} declares a {n}-byte header, over the {max_header}-byte cap (corrupt file)")
            return None
        if 8 + n > size:
            problems.append(
                f"{WEIGHTS_NAME} declares a {n}-byte header but the file has only {size} bytes (truncated or corrupt)"
            )
            return None
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{WEIGHTS_NAME} header is not valid JSON ({e}); the file is corrupt")
        return None
    if not isinstance(header, dict):
        problems.append(f"{WEIGHTS_NAME} header is not a JSON object; the file is corrupt")
        return None
    header.pop("__metadata__", None)
    if not header:
        problems.append(f"{WEIGHTS_NAME} holds no tensors")
    data_len = size - 8 - n
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"tensor {key!r}: malformed header entry {entry!r}")
            continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
            problems.append(f"tensor {key!r} has dtype {dtype!r}; allowed: {', '.join(_ALLOWED_DTYPES)}")
            continue
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            problems.append(f"tensor {key!r} has an invalid shape {shape!r}")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            problems.append(f"tensor {key!r} has data_offsets {offsets!r} outside the {data_len}-byte data section")
            continue
        if offsets[1] - offsets[0] != math.prod(shape) * _ALLOWED_DTYPES[dtype]:
            problems.append(f"tensor {key!r}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}")
            continue
        spans.append((offsets[0], offsets[1], key))
    if len(spans) != len(header):
        # the layout checks below would only echo the entries already reported; the key checks get the
        # well-formed entries only
        return {key: header[key] for _, _, key in spans}
    spans.sort()
    end = 0
    for start, stop, key in spans:
        if start != end:
            problems.append(f"tensor {key!r} overlaps another tensor or leaves a gap in the data section (corrupt)")
            break
        end = stop
    else:
        if spans and end != data_len:
            problems.append(f"{WEIGHTS_NAME} has {data_len - end} trailing bytes after the last tensor (corrupt)")
    return header


def _check_keys(header: dict, spec: ModelSpec, config: dict, rank: int | None, problems: list[str]) -> dict:
    layers = spec.layer_index()
    found: dict[str, dict[str, str]] = {}
    mismatched: list[tuple[str, int]] = []
    for key in header:
        match = _KEY_RE.match(key)
        if not match:
            problems.append(
                f"tensor {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' / '.lora_B.weight'; "
                "modules_to_save, DoRA magnitudes and biases are not supported)"
            )
            continue
        module, which = match["module"], match["which"]
        layer = layers.get(module)
        if layer is None:
            short = module.rsplit(".", 1)[-1]
            if short in spec.embedding_modules or short == "lm_head":
                problems.append(f"tensor {key!r} targets embedding/output layer '{short}', which cannot be hot-swapped")
            else:
                problems.append(
                    f"tensor {key!r} targets {module!r}, which is not a LoRA layer of the replicas "
                    f"(prepared: {sorted(spec.target_modules)}; keys look like "
                    f"'{spec.layers[0].name}.lora_A.weight')"
                )
            continue
        shape = header[key]["shape"]
        if len(shape) != 2:
            problems.append(f"tensor {key!r} has shape {shape}, expected a matrix")
            continue
        r = shape[0] if which == "A" else shape[1]
        expected = [r, layer.in_features] if which == "A" else [layer.out_features, r]
        if shape != expected:
            dims = f"in_features={layer.in_features}" if which == "A" else f"out_features={layer.out_features}"
            problems.append(f"tensor {key!r} has shape {shape}, expected {expected} for {module} ({dims})")
        elif r > spec.max_rank:
            problems.append(f"tensor {key!r} has rank {r} > max_rank={spec.max_rank}")
        elif rank is not None and r != rank:
            mismatched.append((key, r))
        found.setdefault(module, {})[which] = key
    if mismatched:
        ranks = sorted({r for _, r in mismatched})
        problems.append(
            f"{len(mismatched)} tensors (e.g. {mismatched[0][0]!r}) have rank {ranks} but adapter_config.json says "
            f"r={rank}; rank_pattern is not supported, so every layer must have rank r"
        )
    for module, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            problems.append(f"module {module!r} has no {missing}.weight; the adapter file is incomplete")
    targets = config.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):  # else _check_targets reported it
        outside = sorted({m.rsplit(".", 1)[-1] for m in found} - set(targets))
        if outside:
            problems.append(f"tensors target {outside}, which adapter_config.json's target_modules does not list")
    elif isinstance(targets, str):  # a regex PEFT full-matches against each module's name (else _check_targets said)
        try:
            pattern = re.compile(targets)
        except re.error:
            pattern = None
        outside = sorted(m.removeprefix("base_model.model.") for m in found
                         if pattern is not None and not pattern.fullmatch(m.removeprefix("base_model.model.")))
        if outside:
            problems.append(f"adapter_config.json's target_modules regex {targets!r} does not match the modules of "
                            f"{len(outside)} tensor pairs (e.g. {outside[0]!r}): PEFT would not load them; fix the "
                            "regex or drop those tensors")
    return {m: (p["A"], p["B"]) for m, p in found.items() if set(p) == {"A", "B"}}


def _load_finite(path: Path, modules: dict[str, tuple[str, str]], problems: list[str],
                 serving_dtype: torch.dtype | None = None) -> dict:
    from safetensors import SafetensorError, safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for module, (key_a, key_b) in modules.items():
                pair = []
                for key in (key_a, key_b):
                    t = f.get_tensor(key)
                    if not torch.isfinite(t).all():
                        bad = int((~torch.isfinite(t)).sum())
                        problems.append(f"tensor {key!r} has {bad} NaN/Inf values")
                    elif serving_dtype is not None and t.abs().max() > torch.finfo(serving_dtype).max:
                        name = str(serving_dtype).removeprefix("torch.")
                        problems.append(f"tensor {key!r} has values up to {float(t.abs().max()):g}, beyond "
                                        f"{name}'s largest finite {torch.finfo(serving_dtype).max:g} (the replicas' "
                                        "dtype): they would become inf; rescale the adapter or serve a wider dtype")
                    pair.append(t)
                tensors[module] = (pair[0], pair[1])
    except SafetensorError as e:
        problems.append(f"{WEIGHTS_NAME} could not be read: {e}")
    return dict(sorted(tensors.items(), key=lambda kv: kv[0]))
