"""One adapter swap, per method, side by side in one run: ``python -m benchmarks.swap [--quick] --json PATH``.

For each model: the memory-copy floor (the bytes a swap copies, between preallocated tensors with
the swaps' access pattern: three adapters in turn into two slots in turn),
our engine's swap from staged tensors (``engine.apply``, method ``foreach``: one contiguous copy
of the packed rank-major prefix into the idle slot, see :mod:`hotswap.slots`), PEFT's
``hotswap_adapter_from_state_dict`` with the same staged tensors into the same slot
(``engine.apply(method="peft")``), PEFT's ``hotswap_adapter`` from the folder on disk, and what
users do without hotswap: ``delete_adapter`` + ``load_adapter`` + the first forward of the
compiled model (a recompile). Reports median and p90 and the recompiles each path caused.

``--quick`` runs the built-in tiny model only (under 2 minutes on 2 CPU cores); without it
a TinyLlama-1.1B-shaped model (random weights) with a rank-16 adapter on all seven
projections and ``max_rank`` 64 is measured too.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._cluster import gpu, progress, write_result

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _stats(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90, "max": ordered[-1], "n": len(ordered)}


def _timed(fn, reps: int, *, sync) -> list[float]:
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _big_base(cache: Path) -> Path:
    """A TinyLlama-1.1B-shaped Llama with random weights, saved once (about 4.4 GB in float32).

    With CUDA it is initialised on the GPU and saved in bfloat16 (2.2 GB, what the GPU engine loads): the
    random init of 1.1B parameters takes minutes of CPU time, and a GPU machine is lent by the minute."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hotswap.builtin import materialize_builtin_model

    cuda = torch.cuda.is_available()
    out = cache / "models" / ("tinyllama-1.1b-shape-v1-bf16" if cuda else "tinyllama-1.1b-shape-v1")
    if (out / "config.json").exists():
        return out
    # built beside, then renamed: a run stopped mid-save (a GPU budget's timeout) leaves no half model that looks whole
    build = out.with_name(out.name + ".partial")
    shutil.rmtree(build, ignore_errors=True)
    progress(f"building the 1.1B-shaped model (random init on the {'GPU' if cuda else 'CPU'}, once)")
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config)
    (model.to(torch.bfloat16) if cuda else model).save_pretrained(str(build))
    del model
    tiny = materialize_builtin_model("tiny-llama", cache_dir=cache)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(str(build))
    build.rename(out)
    return out


def _print_profile(name: str, fn, reps: int) -> None:
    """Where an engine swap spends its time: cProfile over ``reps`` swaps, top entries by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        fn()
    profiler.disable()
    print(f"\nprofile of {reps} engine swaps, {name} (ms per swap, own time):")
    stats = pstats.Stats(profiler).stats
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    for (file, line, func), (_, calls, own, _, _) in top:
        print(f"  {own / reps * 1e3:8.3f}  {calls // reps:5d} calls  {func} ({Path(file).name}:{line})")


def _peft_hotswap_from_disk(engine, folder: Path, device) -> None:
    """PEFT's ``hotswap_adapter`` from the folder on disk into the engine's idle slot.

    The engine's slots read one per-row scaling tensor each, which PEFT's ``_update_scaling``
    cannot compare with a float, so this does what ``SwapEngine._peft_copy`` does for the
    staged path: pause the scheduler, set each layer's selector aside for a 0-d tensor while
    PEFT runs, put it back. PEFT's ``hotswap_adapter`` checks the new config against
    ``model.active_peft_config``: that is the slot's own for the duration.
    """
    from peft.utils.hotswap import hotswap_adapter

    slot = engine.idle_slot()
    name = engine.slot_names[slot]
    model = engine.peft_model
    engine.scheduler.pause()
    modules = engine._modules
    selectors = [m.scaling[name] for m in modules]
    active = model.active_adapter
    try:
        for m in modules:
            m.scaling[name] = torch.tensor(0.0)
        model.active_adapter = name  # what active_peft_config reads (the layers' active set is unchanged)
        with torch.no_grad():
            hotswap_adapter(model, str(folder), adapter_name=name, torch_device=str(device))
    finally:
        model.active_adapter = active
        for m, selector in zip(modules, selectors):
            m.scaling[name] = selector
        engine.scheduler.resume()


def bench_model(name: str, base: Path, *, max_rank: int, adapters: list[dict], reps: int, reload_reps: int,
                cache: Path, compile_model: bool, profile: bool = False, compile_mode: str | None = None) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hotswap.adapters import model_spec_for, prepare_adapter
    from hotswap.builtin import write_random_adapter
    from hotswap.engine import SwapEngine
    from hotswap.settings import HotswapSettings

    settings = HotswapSettings(base_model=str(base), cache_dir=cache, local_store_root=cache / "bench-store",
                               max_rank=max_rank, compile=compile_model, max_batch_size=1,
                               prefill_chunk_tokens=8, max_seq_len=32,
                               **({"compile_mode": compile_mode} if compile_mode else {}))
    folders = []
    for i, params in enumerate(adapters):
        folder = settings.store_root / f"{name}-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            progress(f"writing adapter {folder.name}")
            write_random_adapter(base, folder, **params)
        folders.append(folder)
    progress(f"{name}: building and compiling the engine")
    engine = SwapEngine.build(settings)
    device = engine.device
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    spec = model_spec_for(settings)
    staged = [prepare_adapter(str(f), settings=settings, spec=spec, dtype=engine.dtype) for f in folders]
    nbytes = staged[0].nbytes

    # Every timed swap below loads a version the idle slot does not hold: three adapters in turn into the two
    # slots in turn (the slot receiving one last held the one before it). Loading the version the idle slot
    # already holds is no copy at all (a flip back, timed separately as engine_revert_ms).
    turn = [0]

    def next_adapter() -> int:
        held = engine.slots[engine.idle_slot()].version
        turn[0] = (turn[0] + 1) % len(staged)
        if staged[turn[0]].identity == held:
            turn[0] = (turn[0] + 1) % len(staged)
        return turn[0]

    # the floor: the bytes a swap copies (the packed (rank, R) slot prefix), one copy between preallocated tensors
    # on the model's device, with the engine's access pattern (three sources into two destinations in turn). The
    # same pair copied again and again is partly served from a large last-level cache (this machine: 100 MB of
    # a 480 MiB L3): that figure is kept as memcpy_same_pair_ms.
    copy_bytes = staged[0].packed_nbytes
    srcs = [torch.empty(copy_bytes // engine.dtype.itemsize, dtype=engine.dtype, device=device).normal_()
            for _ in staged]
    dsts = [torch.empty_like(srcs[0]) for _ in range(2)]
    for i, src in enumerate(srcs):
        dsts[i % 2].copy_(src)  # warm-up, as every method gets: the first copy also faults the pages in
    floor_turn = [0]

    def floor_copy():
        floor_turn[0] += 1
        dsts[floor_turn[0] % 2].copy_(srcs[floor_turn[0] % len(srcs)])

    memcpy = _timed(floor_copy, reps, sync=sync)
    memcpy_same_pair = _timed(lambda: dsts[0].copy_(srcs[0]), reps, sync=sync)

    graphs = engine.compiled_graphs
    copy_ms = []  # what the engine itself reports for the copy (and PEFT's bookkeeping), per swap

    def engine_swap():
        copy_ms.append(engine.apply(staged[next_adapter()]))  # into the idle slot, then made active

    progress(f"{name}: engine swaps")
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine_swap()  # warm-up
        copy_ms.clear()
        ours = _timed(engine_swap, reps, sync=sync)
        engine.last_logits(["still serving"])
    engine_recompiles = engine.compiled_graphs - graphs
    if profile:
        _print_profile(name, engine_swap, reps)

    progress(f"{name}: engine reverts (the idle slot holds the version: a flip, no copy)")
    back = [0]

    def engine_revert():
        back[0] ^= 1
        engine.apply(staged[back[0]])

    engine_revert()
    engine_revert()  # both slots now hold staged[0] and staged[1]: from here on every apply is a flip
    revert_ms = _timed(engine_revert, reps, sync=sync)

    progress(f"{name}: PEFT hotswap_adapter_from_state_dict (engine.apply(method='peft'))")

    def peft_swap():
        engine.apply(staged[next_adapter()], method="peft")

    peft_swap()
    peft_sd = _timed(peft_swap, reps, sync=sync)

    progress(f"{name}: PEFT hotswap_adapter from disk")

    def peft_disk():
        _peft_hotswap_from_disk(engine, folders[next_adapter()], device)

    peft_disk()
    peft_from_disk = _timed(peft_disk, reps, sync=sync)
    # PEFT wrote the idle slot behind the engine's back: make both slots true again (two real loads of the base)
    engine.reset_to_base()
    engine.reset_to_base()
    engine.apply(staged[0])
    engine.last_logits(["still serving"])

    reload_ms, reload_recompiles = [], None
    if compile_model and reload_reps:
        # every reload is a new version with its own alpha: reloading an (r, alpha) seen before would hit a graph
        # dynamo already cached, which is not what shipping a new fine-tune looks like
        fresh = []
        for i in range(reload_reps):
            folder = settings.store_root / f"{name}-reload-{i}"
            if not (folder / "adapter_model.safetensors").exists():
                write_random_adapter(base, folder, **{**adapters[0], "lora_alpha": 3 + i, "seed": 100 + i})
            fresh.append(folder)
        progress(f"{name}: delete_adapter + load_adapter + first compiled forward ({reload_reps} times)")
        from torch._dynamo.testing import CompileCounterWithBackend

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=engine.dtype).to(device), str(folders[0])
        ).eval()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter)
        ids = torch.ones((1, 8), dtype=torch.long, device=device)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1000, accumulated_recompile_limit=10000):
            compiled(input_ids=ids)
            before = counter.frame_count

            versions = iter(fresh)

            def reload():
                model.delete_adapter("default")
                model.load_adapter(str(next(versions)), adapter_name="default")
                model.set_adapter("default")
                compiled(input_ids=ids)

            reload_ms = _timed(reload, reload_reps, sync=sync)
            reload_recompiles = counter.frame_count - before

    result = {
        "model": name,
        "device": str(device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "compile": compile_model,
        "compile_mode": settings.compile_mode if compile_model else None,
        "adapter_bytes": nbytes,
        "copy_bytes": copy_bytes,
        "adapter_slots": settings.adapter_slots,
        "adapter_rank": staged[0].rank,
        "max_rank": max_rank,
        "memcpy_ms": _stats(memcpy),
        "memcpy_same_pair_ms": _stats(memcpy_same_pair),
        "engine_swap_ms": _stats(ours),
        "engine_copy_ms": _stats(copy_ms),
        "engine_revert_ms": _stats(revert_ms),
        "peft_from_state_dict_ms": _stats(peft_sd),
        "peft_hotswap_adapter_ms": _stats(peft_from_disk),
        "reload_recompile_ms": _stats(reload_ms) if reload_ms else None,
        "reload_compile_mode": "default" if reload_ms else None,  # the naive path compiles without CUDA graphs
        "engine_recompiles": engine_recompiles,
        "reload_recompiles": reload_recompiles,
    }
    engine.close()
    med = result["engine_swap_ms"]["median"]
    result["ratios"] = {
        "engine_swap_over_memcpy": med / result["memcpy_ms"]["median"],
        "engine_copy_over_memcpy": result["engine_copy_ms"]["median"] / result["memcpy_ms"]["median"],
        "engine_swap_over_memcpy_same_pair": med / result["memcpy_same_pair_ms"]["median"],
        "peft_from_state_dict_over_engine_swap": result["peft_from_state_dict_ms"]["median"] / med,
        "peft_hotswap_adapter_over_engine_swap": result["peft_hotswap_adapter_ms"]["median"] / med,
        "reload_recompile_over_engine_swap": (result["reload_recompile_ms"]["median"] / med) if reload_ms else None,
    }
    return result


def _print_table(results: list[dict]) -> None:
    keys = ["memcpy_ms", "memcpy_same_pair_ms", "engine_swap_ms", "engine_copy_ms", "engine_revert_ms",
            "peft_from_state_dict_ms", "peft_hotswap_adapter_ms", "reload_recompile_ms"]
    for r in results:
        mode = f", compiled ({r['compile_mode']})" if r.get("compile") else ", eager"
        print(f"\n{r['model']}  ({r['device']}, {r['dtype']}{mode}, adapter r={r['adapter_rank']}, "
              f"{r['adapter_bytes'] / 1e6:.2f} MB, {r['copy_bytes'] / 1e6:.2f} MB copied per swap, "
              f"max_rank {r['max_rank']}, {r['adapter_slots']} slots)")
        print(f"  {'method':28} {'median ms':>11} {'p90 ms':>10} {'max ms':>10} {'n':>4}")
        for k in keys:
            s = r[k]
            if s:
                print(f"  {k:28} {s['median']:11.3f} {s['p90']:10.3f} {s['max']:10.3f} {s['n']:4d}")
        print(f"  recompiles: engine {r['engine_recompiles']}, reload {r['reload_recompiles']}")
        ratios = r["ratios"]
        print(f"  engine_swap / memcpy = {ratios['engine_swap_over_memcpy']:.2f}x "
              f"(engine_copy / memcpy = {ratios['engine_copy_over_memcpy']:.2f}x);  "
              f"peft_from_state_dict / engine_swap = {ratios['peft_from_state_dict_over_engine_swap']:.2f}x"
              + (f";  reload_recompile / engine_swap = {ratios['reload_recompile_over_engine_swap']:.0f}x"
                 if ratios["reload_recompile_over_engine_swap"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the JSON result")
    parser.add_argument("--reps", type=int, default=30, help="timed swaps per method (default 30)")
    parser.add_argument("--cache-dir", default=None, help="models and adapters (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the engine swaps")
    parser.add_argument("--compile-mode", default=None,
                        help="the engines' compile_mode (default: the setting's default); reduce-overhead on a GPU")
    parser.add_argument("--reload-reps", type=int, default=None,
                        help="timed reloads (each a recompile) per model (default: 20 tiny, 3 1.1B; 5 tiny --quick); "
                             "0 skips them (a 1.1B recompile takes minutes)")
    args = parser.parse_args(argv)
    if args.reps < 20:
        parser.error("--reps must be at least 20")
    if args.reload_reps is not None and args.reload_reps < 0:
        parser.error("--reload-reps must be 0 (skip the reloads) or more")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        from hotswap.builtin import materialize_builtin_model

        results: list[dict] = []
        machine_info = {"platform": platform.platform(), "cpus": torch.get_num_threads(),  # threads torch uses
                        "torch": torch.__version__, "cuda": torch.cuda.is_available(), **gpu()}

        def done(result: dict) -> None:
            """Keep a model's figures as soon as it is measured: a run stopped later still leaves them."""
            results.append(result)
            write_result("swap", args.json, argv, {"results": results}, machine_info=machine_info)
            _print_table([result])
            print(f"\nwrote {args.json} ({len(results)} model{'s' if len(results) > 1 else ''})")

        tiny = materialize_builtin_model("tiny-llama", cache_dir=cache)
        done(bench_model(
            "builtin:tiny-llama", tiny, max_rank=16, cache=cache, compile_model=True, reps=args.reps,
            profile=args.profile, compile_mode=args.compile_mode,
            reload_reps=(5 if args.quick else 20) if args.reload_reps is None else args.reload_reps,
            adapters=[dict(r=8, lora_alpha=16, target_modules=ALL_PROJ, seed=1),
                      dict(r=8, lora_alpha=8, target_modules=ALL_PROJ, seed=2),
                      dict(r=8, lora_alpha=12, target_modules=ALL_PROJ, seed=3)],
        ))
        if not args.quick:
            big = _big_base(cache)
            done(bench_model(
                "tinyllama-1.1b-shape", big, max_rank=64, cache=cache, reps=args.reps,
                reload_reps=3 if args.reload_reps is None else args.reload_reps, profile=args.profile,
                compile_mode=args.compile_mode,
                compile_model=torch.cuda.is_available(),  # compiling 1.1B on 2 CPU cores takes too long to repeat
                adapters=[dict(r=16, lora_alpha=32, target_modules=ALL_PROJ, seed=1),
                          dict(r=16, lora_alpha=16, target_modules=ALL_PROJ, seed=2),
                          dict(r=16, lora_alpha=24, target_modules=ALL_PROJ, seed=3)],
            ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
