"""Typed, validated settings for the hotswap service, built once at the entry point.

The same model validates ``applications[].args`` of the Serve config, the CLI and the
tests. Unknown keys are rejected so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hotswap.errors import ConfigError

__all__ = ["DEFAULT_TARGET_MODULES", "HotswapSettings", "default_cache_dir"]

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def default_cache_dir() -> Path:
    """``$HOTSWAP_CACHE_DIR``, else ``~/.cache/hotswap``: built-in models, the adapter cache, the local store."""
    env = os.environ.get("HOTSWAP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hotswap"


class HotswapSettings(BaseModel):
    """Everything a replica, the controller and the CLI need to agree on.

    Every replica of one application runs the same base model prepared the same way
    (``target_modules`` padded to ``max_rank``), so an adapter validated once against these
    settings fits every replica.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        "builtin:tiny-llama",
        description="'builtin:tiny-llama' (generated offline on first use), a local transformers "
        "checkpoint directory with its tokenizer, or a Hugging Face model id.",
    )
    initial_adapter: str | None = Field(
        None,
        description="Adapter URI served before any roll: s3://bucket/prefix, file:///path or a path "
        "under local_store_root; None serves the base model (all LoRA weights zero). "
        "'builtin:demo' is a demo adapter for the built-in model, generated on first use.",
    )
    max_rank: int = Field(16, ge=1, le=1024, description="Every LoRA layer is padded to this rank.")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES,
        min_length=1,
        description="Names of the Linear modules that carry LoRA; adapters may target any subset.",
    )
    compile: bool = Field(True, description="torch.compile the model; False runs eagerly.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="Inductor mode; 'reduce-overhead' (CUDA graphs) is for GPUs."
    )
    compile_wrapper: Literal["auto", "cpp", "python"] = Field(
        "auto", description="Inductor's wrapper around the compiled kernels. 'cpp' calls them from C++ and "
        "releases Python's GIL while the compiled graph runs, so the replica's request handling runs beside it "
        "(BENCHMARKS.md measures it); 'python' is inductor's default. 'auto' is 'cpp' on CPU and 'python' on CUDA "
        "(where 'reduce-overhead' replays CUDA graphs)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype; 'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    max_batch_size: int = Field(4, ge=1, le=256, description="Sequences decoded together in one step.")
    prefill_chunk_tokens: int = Field(
        16, ge=1, le=8192, description="Prompts are prefilled in chunks of this many tokens (one compiled shape)."
    )
    max_seq_len: int = Field(256, ge=4, description="Prompt plus completion tokens allowed per request.")
    adapter_slots: Literal[1, 2] = Field(
        2, description="Adapter versions resident in each replica's compiled model. With 2 a swap loads the slot "
        "no request reads and never drains (each LoRA layer computes both slots: BENCHMARKS.md measures the cost); "
        "with 1 a swap waits for the requests in flight."
    )
    max_queued_requests: int = Field(
        64, ge=0, le=100_000, description="Requests a replica queues for a free batch row; beyond that the "
        "service answers 429 with Retry-After."
    )
    stream_interval_ms: float = Field(
        50.0, ge=0, le=1000, description="A stream's text items are at least this far apart: the tokens made in "
        "between go out as one item (the first text and the end are never held back). Fewer, larger items cost "
        "the service less per token; 0 sends each token as soon as it is decoded."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where models and adapters are cached.")
    local_store_root: Path | None = Field(
        None, description="Root of the local adapter store; defaults to <cache_dir>/adapters."
    )
    max_adapter_bytes: int = Field(2 << 30, ge=1, description="Largest adapter_model.safetensors accepted.")
    max_header_bytes: int = Field(16 << 20, ge=64, description="Largest safetensors JSON header accepted.")
    state_uri: str | None = Field(
        None,
        description="Where the controller persists its state: s3://bucket/key or a local path; "
        "default <cache_dir>/state/<app name>.json.",
    )
    rollout_batch_size: int = Field(1, ge=1, le=64, description="Replicas swapped together in one rollout step.")
    swap_timeout_s: float = Field(
        120.0, gt=0, description="How long a replica may take to drain, swap and smoke-check before the rollout "
        "is stopped and reverted."
    )
    replica_liveness_s: float = Field(
        30.0, gt=0, description="A replica not heard from for this long is considered gone; must exceed 1.5 x "
        "watch_timeout_s (replicas report at least once per watch)."
    )
    watch_timeout_s: float = Field(
        5.0, gt=0, le=300, description="How long a replica's long-poll waits for a new assignment; it is also "
        "the replicas' heartbeat interval (they heartbeat while they swap, too)."
    )
    controller_nice: int = Field(
        10, ge=0, le=19, description="The controller process's CPU priority (Unix nice, every thread): fetch, "
        "validate, stage and the replicas' long-polls yield the CPU to serving when both want it. 0 keeps the "
        "priority Ray gives it."
    )
    adapter_cache_max_bytes: int = Field(
        20 << 30, ge=1, description="Byte cap of the controller's download cache (LRU eviction; the versions in "
        "use are always kept)."
    )
    s3_endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/.*)?$", max_length=2048,
        description="S3 endpoint (MinIO, a proxy); default: boto3's own (AWS_ENDPOINT_URL_S3, then AWS)."
    )
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_read_timeout_s: float = Field(30.0, gt=0, description="A read that stalls this long is retried.")
    s3_max_attempts: int = Field(4, ge=1, le=20, description="Attempts per object, including the first.")
    s3_retry_backoff_s: float = Field(0.2, ge=0, description="First backoff; doubles per attempt.")
    signature_required: bool = Field(
        False, description="Refuse adapters without a model.sig (OpenSSF model signing) by a trusted key."
    )
    trusted_public_keys: tuple[str, ...] = Field(
        (), description="PEM elliptic-curve public keys (local paths or s3://bucket/key) whose signatures are "
        "accepted; a signed adapter is verified whenever this is set."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _listify(cls, value):
        if isinstance(value, str):
            raise ValueError("give target_modules as a list of module names, e.g. [q_proj, v_proj]")
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> HotswapSettings:
        if self.prefill_chunk_tokens > self.max_seq_len:
            raise ValueError(
                f"prefill_chunk_tokens ({self.prefill_chunk_tokens}) must not exceed max_seq_len ({self.max_seq_len})"
            )
        if self.replica_liveness_s < 1.5 * self.watch_timeout_s:
            raise ValueError(
                f"replica_liveness_s ({self.replica_liveness_s:g}) must be at least 1.5 x watch_timeout_s "
                f"({self.watch_timeout_s:g}): replicas report once per watch, so a shorter liveness makes idle "
                f"replicas look dead; raise replica_liveness_s to {1.5 * self.watch_timeout_s:g} or more"
            )
        if self.compile_mode == "reduce-overhead" and self.device == "cpu":
            raise ValueError("compile_mode 'reduce-overhead' uses CUDA graphs; use 'default' with device 'cpu'")
        if self.signature_required and not self.trusted_public_keys:
            raise ValueError("signature_required is true but trusted_public_keys is empty, so no adapter could "
                             "pass; list the signers' PEM public keys in trusted_public_keys, or set "
                             "signature_required: false")
        return self

    @property
    def fingerprint(self) -> str:
        """Names one settings generation: a redeploy with other settings gets another controller."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    @property
    def store_root(self) -> Path:
        """The local adapter store root: ``local_store_root`` or ``<cache_dir>/adapters``."""
        return self.local_store_root if self.local_store_root is not None else self.cache_dir / "adapters"

    @classmethod
    def from_args(cls, args: dict | None) -> HotswapSettings:
        """Validate application arguments; raise :class:`ConfigError` naming every bad key and the fix."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise ConfigError(_describe(e)) from e


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            known = ", ".join(sorted(HotswapSettings.model_fields))
            parts.append(f"unknown key '{key}' (known keys: {known})")
        else:
            parts.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return "invalid hotswap settings: " + "; ".join(parts)
