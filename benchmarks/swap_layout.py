"""What a swap's destination layout costs against one memcpy: ``python -m benchmarks.swap_layout [--json PATH]``.

No model: tensors of the TinyLlama-1.1B shapes (22 layers, 7 projections) and a rank-16
adapter (``max_rank`` 64). Side by side, the same adapter bytes copied

- as one flat copy between preallocated tensors (the floor);
- into PEFT's own padded layout, ``lora_A`` as ``(max_rank, in)`` and ``lora_B`` as ``(out, max_rank)``:
  the ``lora_A`` row slices and the strided ``lora_B`` column slices, each as one ``_foreach_copy_``
  (308 destinations);
- into the engine's rank-major slot layout (:class:`hotswap.slots.SlotLayout`): one ``(max_rank, R)``
  buffer per slot whose rank row ``k`` holds row ``k`` of every ``lora_A`` and column ``k`` of every
  ``lora_B``, so the adapter is the prefix ``buffer[:r]`` and the swap is one contiguous copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks._cluster import write_json

LAYERS = 22
DIMS = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 5632), (2048, 5632), (5632, 2048)]  # (in, out)


def _median_ms(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def _layout(max_rank: int):
    """The engine's slot layout for the 1.1B shapes (what ``SlotLayout.from_spec`` gives for that model)."""
    from hotswap.slots import SlotLayout
    from hotswap.validation import LoraLayerSpec, ModelSpec

    layers = tuple(LoraLayerSpec(f"layers.{i}.proj{j}", fan_in, fan_out)
                   for i in range(LAYERS) for j, (fan_in, fan_out) in enumerate(DIMS))
    return SlotLayout.from_spec(ModelSpec(layers, frozenset(), max_rank))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    r, big = args.rank, args.max_rank
    torch.manual_seed(0)
    a_dst = [torch.zeros(big, i) for _ in range(LAYERS) for i, _ in DIMS]
    b_dst = [torch.zeros(o, big) for _ in range(LAYERS) for _, o in DIMS]
    a_src = [torch.randn(r, a.shape[1]) for a in a_dst]
    b_src = [torch.randn(b.shape[0], r) for b in b_dst]
    a_views, b_views = [a[:r] for a in a_dst], [b[:, :r] for b in b_dst]
    nbytes = sum(t.numel() * t.element_size() for t in a_src + b_src)
    flat_src = torch.randn(nbytes // 4)
    flat_dst = torch.empty_like(flat_src)

    layout = _layout(big)
    slot = layout.allocate(dtype=torch.float32)  # one slot buffer (max_rank, R)
    packed = layout.pack(r, dict(enumerate(zip(a_src, b_src))), dtype=torch.float32)  # what staging makes, once
    assert packed.numel() * packed.element_size() == nbytes  # every layer targeted: the prefix is the adapter

    def rank_major() -> None:
        slot[:r].copy_(packed)

    rank_major()
    assert torch.equal(layout.a_view(slot, 5)[:r], a_src[5]) and torch.equal(layout.b_view(slot, 5)[:, :r], b_src[5])
    result = {
        "adapter_bytes": nbytes,
        "destinations": len(a_views) + len(b_views),
        "threads": torch.get_num_threads(),
        "slot_buffer_shape": list(slot.shape),
        "flat_copy_ms": _median_ms(lambda: flat_dst.copy_(flat_src), args.reps),
        "lora_A_rows_ms": _median_ms(lambda: torch._foreach_copy_(a_views, a_src), args.reps),
        "lora_B_strided_cols_ms": _median_ms(lambda: torch._foreach_copy_(b_views, b_src), args.reps),
        "rank_major_copy_ms": _median_ms(rank_major, args.reps),
    }
    both = result["lora_A_rows_ms"] + result["lora_B_strided_cols_ms"]
    result["layout_over_flat"] = both / result["flat_copy_ms"]
    result["rank_major_over_flat"] = result["rank_major_copy_ms"] / result["flat_copy_ms"]
    print(f"{nbytes / 1e6:.1f} MB, {r=} of max_rank {big}, {result['threads']} threads, median of {args.reps}")
    for key, label in (("flat_copy_ms", "one flat copy (floor)"),
                       ("lora_A_rows_ms", f"PEFT lora_A rows ({len(a_views)})"),
                       ("lora_B_strided_cols_ms", f"PEFT lora_B columns ({len(b_views)})"),
                       ("rank_major_copy_ms", f"rank-major slot {tuple(slot.shape)}")):
        print(f"  {label:34} {result[key]:8.2f} ms")
    print(f"  PEFT layout: A rows + B columns = {both:.2f} ms = {result['layout_over_flat']:.2f}x the flat copy")
    print(f"  rank-major slot prefix = {result['rank_major_over_flat']:.2f}x the flat copy")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
