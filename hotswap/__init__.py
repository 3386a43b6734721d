"""hotswap: serve one base model from many torch.compile'd replicas and swap LoRA adapters in place.

The library imports no Ray Serve deployment code; ``deployments/`` is the thin Serve layer.
Importing this package loads nothing heavy: torch-dependent pieces import on first use.
"""

from hotswap.errors import (
    AdapterError,
    AdapterFetchError,
    AdapterNotFoundError,
    AdapterValidationError,
    ConfigError,
    HotswapError,
    OverloadedError,
    RequestError,
    SwapError,
    UnsafePathError,
)
from hotswap.settings import HotswapSettings

__all__ = [
    "AdapterError",
    "AdapterFetchError",
    "AdapterFetcher",
    "AdapterIdentity",
    "AdapterNotFoundError",
    "AdapterValidationError",
    "ConfigError",
    "HotswapError",
    "HotswapSettings",
    "ModelSpec",
    "OverloadedError",
    "RequestError",
    "SamplingParams",
    "StagedAdapter",
    "SwapEngine",
    "SwapError",
    "UnsafePathError",
    "prepare_adapter",
    "stage_adapter",
    "validate_adapter",
]

_LAZY = {
    "AdapterFetcher": "hotswap.store",
    "AdapterIdentity": "hotswap.staging",
    "ModelSpec": "hotswap.validation",
    "SamplingParams": "hotswap.generation",
    "StagedAdapter": "hotswap.staging",
    "SwapEngine": "hotswap.engine",
    "prepare_adapter": "hotswap.adapters",
    "stage_adapter": "hotswap.staging",
    "validate_adapter": "hotswap.validation",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hotswap' has no attribute {name!r}")
