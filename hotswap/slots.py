"""The rank-major slot layout: one contiguous buffer per adapter slot, whose views are PEFT's LoRA weights.

PEFT pads every ``lora_A`` to ``(max_rank, in)`` and every ``lora_B`` to ``(out, max_rank)``; a
swap into those separate tensors writes hundreds of strided destinations (a rank-16 adapter of
a 1.1B-shaped model: 308 destinations, 2.5x the memcpy of the same bytes). Here each slot owns
one buffer of shape ``(max_rank, R)``, ``R = sum(in + out)`` over the spec's layers, and rank row
``k`` holds row ``k`` of every ``lora_A`` and column ``k`` of every ``lora_B``, side by side:

    buffer[k] = [A_0[k, :] | B_0[:, k] | A_1[k, :] | B_1[:, k] | ...]

so ``lora_A`` of layer ``i`` is the view ``buffer[:, a_i : a_i + in_i]`` (strides ``(R, 1)``) and
``lora_B`` is ``buffer[:, b_i : b_i + out_i].T`` (strides ``(1, R)``), both BLAS layouts that
need no copy in a matmul. An adapter of rank ``r`` is then the *prefix* ``buffer[:r]``: staging
packs it in the same layout once (layers the adapter does not target are zero), and a swap is
one contiguous copy of ``r * R`` elements plus one contiguous zero of the rank rows the previous
adapter used beyond ``r``.

:meth:`SlotLayout.bind` points the PeftModel's LoRA parameters at the views (after
``prepare_model_for_compiled_hotswap``, before ``torch.compile``); PEFT's modules, its forward and
``hotswap_adapter_from_state_dict`` keep working on them unchanged (they write in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.validation import ModelSpec

__all__ = ["SlotLayout"]


@dataclass(frozen=True)
class SlotLayout:
    """Where each layer's LoRA matrices live in a slot buffer (a pure function of the spec)."""

    max_rank: int
    row_width: int  # R: elements per rank row
    a_offsets: tuple[int, ...]
    b_offsets: tuple[int, ...]
    in_features: tuple[int, ...]
    out_features: tuple[int, ...]

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SlotLayout:
        a_offsets, b_offsets, offset = [], [], 0
        for layer in spec.layers:
            a_offsets.append(offset)
            offset += layer.in_features
            b_offsets.append(offset)
            offset += layer.out_features
        return cls(
            max_rank=spec.max_rank,
            row_width=offset,
            a_offsets=tuple(a_offsets),
            b_offsets=tuple(b_offsets),
            in_features=tuple(x.in_features for x in spec.layers),
            out_features=tuple(x.out_features for x in spec.layers),
        )

    def a_view(self, buffer: torch.Tensor, layer: int) -> torch.Tensor:
        """``lora_A`` of ``layer``: ``(rows of buffer, in)``, a view."""
        start = self.a_offsets[layer]
        return buffer[:, start : start + self.in_features[layer]]

    def b_view(self, buffer: torch.Tensor, layer: int) -> torch.Tensor:
        """``lora_B`` of ``layer``: ``(out, rows of buffer)``, a view."""
        start = self.b_offsets[layer]
        return buffer[:, start : start + self.out_features[layer]].T

    def allocate(self, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed slot buffer (every LoRA weight zero: the base model)."""
        return torch.zeros((self.max_rank, self.row_width), dtype=dtype, device=device)

    def pack(
        self,
        rank: int,
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]],
        *,
        dtype: torch.dtype,
        pin_memory: bool = False,
    ) -> torch.Tensor:
        """One ``(rank, R)`` buffer holding ``layers`` (index -> ``(lora_A (rank, in), lora_B (out, rank))``).

        Layers not listed are zero. The caller has validated shapes (``validate_adapter``).
        """
        packed = torch.zeros((rank, self.row_width), dtype=dtype, pin_memory=pin_memory)
        for i, (a, b) in layers.items():
            self.a_view(packed, i).copy_(a)
            self.b_view(packed, i).copy_(b)
        return packed

    @torch.no_grad()
    def bind(self, modules: list, adapter_name: str, buffer: torch.Tensor) -> None:
        """Make each module's ``lora_A``/``lora_B`` weight of ``adapter_name`` a view into ``buffer``.

        ``modules[i]`` is the LoRA layer of spec layer ``i``; its weights must already be padded to
        ``max_rank`` (``prepare_model_for_compiled_hotswap``). Their current values are copied in.
        Call before ``torch.compile``.
        """
        for i, module in enumerate(modules):
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            a_view, b_view = self.a_view(buffer, i), self.b_view(buffer, i)
            if a.shape != a_view.shape or b.shape != b_view.shape:
                raise ValueError(
                    f"LoRA weights of layer {i} are {tuple(a.shape)}/{tuple(b.shape)}, the slot layout expects "
                    f"{tuple(a_view.shape)}/{tuple(b_view.shape)}: prepare the model with "
                    f"target_rank={self.max_rank} before binding"
                )
            a_view.copy_(a)
            b_view.copy_(b)
            a.data = a_view
            b.data = b_view
