"""Fetch, validate and stage an adapter version in one call: what the controller does once per version."""

from __future__ import annotations

import logging
import time

import torch

from hotswap.builtin import BUILTIN_DEMO_ADAPTER, BUILTIN_PREFIX, materialize_builtin_model, materialize_demo_adapter
from hotswap.errors import ConfigError
from hotswap.settings import HotswapSettings
from hotswap.staging import StagedAdapter, stage_adapter
from hotswap.store import AdapterFetcher, FetchedAdapter
from hotswap.validation import ModelSpec, ValidatedAdapter, validate_adapter

__all__ = ["fetch_and_validate", "model_spec_for", "prepare_adapter", "resolve_adapter_uri", "validate_fetched"]

logger = logging.getLogger(__name__)


def resolve_adapter_uri(uri: str, settings: HotswapSettings) -> str:
    """Map ``builtin:demo`` to the demo adapter in the local store (generated on first use); other URIs pass."""
    if uri != BUILTIN_DEMO_ADAPTER:
        if uri.startswith(BUILTIN_PREFIX):
            raise ConfigError(f"unknown built-in adapter {uri!r}; the only one is {BUILTIN_DEMO_ADAPTER!r}")
        return uri
    if not settings.base_model.startswith(BUILTIN_PREFIX):
        raise ConfigError(
            f"{BUILTIN_DEMO_ADAPTER} fits only the built-in base model; with base_model={settings.base_model!r} "
            "give initial_adapter as an adapter URI (or null)"
        )
    base = materialize_builtin_model(settings.base_model.removeprefix(BUILTIN_PREFIX), cache_dir=settings.cache_dir)
    materialize_demo_adapter(base_model_dir=base, store_root=settings.store_root)
    return "demo/v1"


def model_spec_for(settings: HotswapSettings) -> ModelSpec:
    """The LoRA layout every replica of these settings has, from the base model's config alone."""
    from transformers import AutoConfig

    from hotswap.builtin import resolve_base_model

    path = resolve_base_model(settings.base_model, cache_dir=settings.cache_dir)
    config = AutoConfig.from_pretrained(path)
    return ModelSpec.from_base_config(config, target_modules=settings.target_modules, max_rank=settings.max_rank)


def fetch_and_validate(
    uri: str, *, settings: HotswapSettings, spec: ModelSpec, fetcher: AdapterFetcher | None = None
) -> ValidatedAdapter:
    """Fetch ``uri`` and validate it against ``spec``; raise the store's errors or ``AdapterValidationError``."""
    fetcher = fetcher if fetcher is not None else AdapterFetcher.from_settings(settings)
    return validate_fetched(fetcher.fetch(resolve_adapter_uri(uri, settings)), settings=settings, spec=spec)


def validate_fetched(fetched: FetchedAdapter, *, settings: HotswapSettings, spec: ModelSpec) -> ValidatedAdapter:
    """Validate an adapter already in the cache against ``spec``, with the size caps of ``settings``."""
    import torch

    return validate_adapter(
        fetched, spec, max_adapter_bytes=settings.max_adapter_bytes, max_header_bytes=settings.max_header_bytes,
        serving_dtype=getattr(torch, settings.dtype) if settings.dtype != "auto" else None,  # auto: bf16 or fp32
    )


def prepare_adapter(
    uri: str,
    *,
    settings: HotswapSettings,
    spec: ModelSpec,
    dtype: torch.dtype,
    fetcher: AdapterFetcher | None = None,
) -> StagedAdapter:
    """Fetch ``uri``, validate it against ``spec`` and stage it in ``dtype``.

    Raises the store's errors (not found, fetch failure, unsafe path) or
    ``AdapterValidationError`` listing every problem; nothing touches a model.
    """
    started = time.perf_counter()
    validated = fetch_and_validate(uri, settings=settings, spec=spec, fetcher=fetcher)
    staged = stage_adapter(validated, spec, dtype=dtype)
    logger.info(
        "prepared adapter %s (sha256 %s, r=%d, %d layers, %d bytes) in %.0f ms",
        validated.uri,
        validated.sha256[:12],
        staged.rank,
        len(staged.layer_indices),
        staged.nbytes,
        (time.perf_counter() - started) * 1e3,
    )
    return staged
