"""Staging: turn a validated adapter into exactly the tensors a replica copies, once.

A :class:`StagedAdapter` is what travels to replicas (through the Ray object store):
the LoRA matrices in the model's dtype, on CPU (pinned when CUDA is present), packed in the
replicas' rank-major slot layout (:mod:`hotswap.slots`: one contiguous ``(rank, R)`` buffer,
so a replica's swap is one memcpy), plus the adapter's identity (an
:class:`~hotswap.versions.AdapterVersion`) and the spec fingerprint it was staged for. Staging
happens once per adapter version, however many replicas apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.slots import SlotLayout
from hotswap.validation import ModelSpec, ValidatedAdapter
from hotswap.versions import AdapterVersion

__all__ = ["AdapterIdentity", "StagedAdapter", "stage_adapter"]


AdapterIdentity = AdapterVersion  # the name engine and replica code used before there was one version type


@dataclass(frozen=True)
class StagedAdapter:
    """Validated, remapped, dtype-converted LoRA tensors, ready for :meth:`SwapEngine.apply`.

    ``packed`` is the ``(rank, R)`` prefix of a slot buffer in ``layout``; ``lora_A[i]``
    (rank x in) and ``lora_B[i]`` (out x rank) are views into it for the spec layer
    ``layer_indices[i]``. Layers of the spec that are not listed are zero in ``packed``.
    Only ``packed`` is pickled (the views are rebuilt), so it crosses the object store once.
    """

    identity: AdapterIdentity
    spec_fingerprint: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    layer_indices: tuple[int, ...]
    packed: torch.Tensor
    layout: SlotLayout

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @property
    def lora_A(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.layout.a_view(self.packed, i) for i in self.layer_indices)

    @property
    def lora_B(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.layout.b_view(self.packed, i) for i in self.layer_indices)

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter's own matrices (what a per-tensor copy would move)."""
        return sum(self.rank * (self.layout.in_features[i] + self.layout.out_features[i]) for i in self.layer_indices
                   ) * self.packed.element_size()

    @property
    def packed_nbytes(self) -> int:
        """Bytes a swap copies (the adapter's rank rows of every layer of the slot, untargeted ones zero)."""
        return self.packed.numel() * self.packed.element_size()

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
    items = dict(sorted((index[name], pair) for name, pair in validated.tensors.items()))
    layout = SlotLayout.from_spec(spec)
    packed = layout.pack(validated.rank, items, dtype=dtype, pin_memory=pin_memory)
    if not torch.isfinite(packed).all():  # finite in the file's dtype, but too large for the model's
        from hotswap.errors import AdapterValidationError

        raise AdapterValidationError(validated.uri, [
            f"weights overflow to inf in the model's dtype {str(dtype).removeprefix('torch.')} (largest finite "
            f"{torch.finfo(dtype).max:g}); retrain or rescale the adapter, or serve a wider dtype"
        ])
    return StagedAdapter(
        identity=AdapterVersion(validated.uri, validated.sha256, validated.config_sha256),
        spec_fingerprint=spec.fingerprint,
        rank=validated.rank,
        lora_alpha=validated.lora_alpha,
        use_rslora=validated.use_rslora,
        target_modules=validated.target_modules,
        layer_indices=tuple(items),
        packed=packed,
        layout=layout,
    )
