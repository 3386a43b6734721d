"""Why a swap into PEFT's LoRA layout costs more than one memcpy: ``python -m benchmarks.swap_layout [--json PATH]``.

No model: tensors of the TinyLlama-1.1B shapes (22 layers, 7 projections), ``lora_A`` as
``(max_rank, in)`` and ``lora_B`` as ``(out, max_rank)`` like PEFT's padded layers, and a
rank-16 adapter. Times one flat copy of the adapter's bytes, the copy into the ``lora_A`` row
slices, and the copy into the strided ``lora_B`` column slices, each as one ``_foreach_copy_``.
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
    result = {
        "adapter_bytes": nbytes,
        "destinations": len(a_views) + len(b_views),
        "threads": torch.get_num_threads(),
        "flat_copy_ms": _median_ms(lambda: flat_dst.copy_(flat_src), args.reps),
        "lora_A_rows_ms": _median_ms(lambda: torch._foreach_copy_(a_views, a_src), args.reps),
        "lora_B_strided_cols_ms": _median_ms(lambda: torch._foreach_copy_(b_views, b_src), args.reps),
    }
    both = result["lora_A_rows_ms"] + result["lora_B_strided_cols_ms"]
    result["layout_over_flat"] = both / result["flat_copy_ms"]
    print(f"{nbytes / 1e6:.1f} MB in {result['destinations']} destinations, {result['threads']} threads, "
          f"median of {args.reps}")
    for key in ("flat_copy_ms", "lora_A_rows_ms", "lora_B_strided_cols_ms"):
        print(f"  {key:24} {result[key]:8.2f} ms")
    print(f"  A rows + B columns = {both:.2f} ms = {result['layout_over_flat']:.2f}x the flat copy")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
