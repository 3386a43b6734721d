"""Staging: turn a validated adapter into exactly the tensors a replica copies, once.

A :class:`StagedAdapter` is what travels to replicas (through the Ray object store):
the LoRA matrices in the model's dtype, on CPU (pinned when CUDA is present), ordered as
the :class:`~hotswap.validation.ModelSpec` orders its layers, plus the adapter's identity
(an :class:`~hotswap.versions.AdapterVersion`) and the spec fingerprint it was staged for. Staging happens once per
adapter version, however many replicas apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.validation import ModelSpec, ValidatedAdapter
from hotswap.versions import AdapterVersion

__all__ = ["AdapterIdentity", "StagedAdapter", "stage_adapter"]


AdapterIdentity = AdapterVersion  # the name engine and replica code used before there was one version type


@dataclass(frozen=True)
class StagedAdapter:
    """Validated, remapped, dtype-converted LoRA tensors, ready for :meth:`SwapEngine.apply`.

    ``layer_indices[i]`` is the position in the spec's layer list of the module whose
    matrices are ``lora_A[i]`` (rank x in) and ``lora_B[i]`` (out x rank). Layers of the spec
    that are not listed are zeroed by a swap.
    """

    identity: AdapterIdentity
    spec_fingerprint: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    layer_indices: tuple[int, ...]
    lora_A: tuple[torch.Tensor, ...]
    lora_B: tuple[torch.Tensor, ...]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.lora_A, *self.lora_B))

    def peft_state_dict(self, spec: ModelSpec, adapter_name: str) -> dict[str, torch.Tensor]:
        """The same tensors keyed for PEFT's ``hotswap_adapter_from_state_dict`` on a PeftModel."""
        out = {}
        for index, a, b in zip(self.layer_indices, self.lora_A, self.lora_B):
            name = spec.layers[index].name
            out[f"{name}.lora_A.{adapter_name}.weight"] = a
            out[f"{name}.lora_B.{adapter_name}.weight"] = b
        return out

    def lora_config(self):
        """A fresh ``LoraConfig`` describing this adapter, built from validated fields only."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=list(self.target_modules),
        )


def stage_adapter(
    validated: ValidatedAdapter,
    spec: ModelSpec,
    *,
    dtype: torch.dtype,
    pin_memory: bool | None = None,
) -> StagedAdapter:
    """Stage a validated adapter for replicas built to ``spec`` running in ``dtype``.

    Args:
        validated: the result of :func:`~hotswap.validation.validate_adapter` for the same ``spec``.
        spec: the replicas' LoRA layout.
        dtype: the replicas' model dtype; tensors are converted once, here.
        pin_memory: pin host memory for fast, asynchronous host-to-GPU copies; default: when CUDA is present.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    index = {layer.name: i for i, layer in enumerate(spec.layers)}
    items = sorted((index[name], pair) for name, pair in validated.tensors.items())
    lora_a, lora_b = [], []
    for _, (a, b) in items:
        a = a.to(dtype=dtype).contiguous()
        b = b.to(dtype=dtype).contiguous()
        if pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        lora_a.append(a)
        lora_b.append(b)
    return StagedAdapter(
        identity=AdapterVersion(validated.uri, validated.sha256, validated.config_sha256),
        spec_fingerprint=spec.fingerprint,
        rank=validated.rank,
        lora_alpha=validated.lora_alpha,
        use_rslora=validated.use_rslora,
        target_modules=validated.target_modules,
        layer_indices=tuple(i for i, _ in items),
        lora_A=tuple(lora_a),
        lora_B=tuple(lora_b),
    )
