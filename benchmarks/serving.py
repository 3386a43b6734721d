"""What compile buys when serving: ``python -m benchmarks.serving --json PATH``.

Side by side in one run, the same service (one replica, the built-in tiny model on CPU by
default) with ``compile: true`` and with ``compile: false``:

- service: tokens/s and p50/p99 latency of ``POST /v1/completions`` through the Serve ingress,
  with 1, 4 and 16 closed-loop clients;
- engine: tokens/s of the replica's generation loop called in-process (no HTTP, no Serve),
  for a batch of 1 and a full batch, which separates the model's compute from Serve's
  per-request overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._cluster import PROMPTS, progress, serve_cluster, wait_until, write_result
from benchmarks.load import ClosedLoop, latency_summary


def _settings_args(args, cache: Path, compiled: bool) -> dict:
    out = {"base_model": args.base_model, "initial_adapter": "builtin:demo", "cache_dir": str(cache),
           "compile": compiled, "device": args.device}
    if args.dtype:
        out["dtype"] = args.dtype
    if compiled and args.compile_mode:
        out["compile_mode"] = args.compile_mode
    return out


def bench_engine(settings_args: dict, *, max_tokens: int, reps: int) -> dict:
    """Tokens/s of the generation loop in-process, batch of 1 and a full batch (every row runs to max_tokens)."""
    from hotswap.adapters import model_spec_for, prepare_adapter
    from hotswap.engine import SwapEngine
    from hotswap.generation import SamplingParams
    from hotswap.settings import HotswapSettings

    settings = HotswapSettings.from_args(settings_args)
    engine = SwapEngine.build(settings)
    engine.apply(prepare_adapter(settings.initial_adapter, settings=settings, spec=model_spec_for(settings),
                                 dtype=engine.dtype))
    out = {}
    for batch in sorted({1, settings.max_batch_size}):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)] * batch
        engine.generate(prompts, params)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            completions, _ = engine.generate(prompts, params)
            times.append(time.perf_counter() - t)
        tokens = sum(c.completion_tokens for c in completions)
        median = statistics.median(times)
        out[f"batch_{batch}"] = {"tokens_per_s": tokens / median, "ms_per_batch": median * 1e3,
                                 "tokens_per_batch": tokens}
    out["compiled_graphs"] = engine.compiled_graphs
    return out


def bench_service(settings_args: dict, *, base_url: str, name: str, concurrency: list[int], seconds: float,
                  max_tokens: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from deployments.app import make_app
    from hotswap.controller import get_controller

    app = f"bench-serving-{name}"
    serve.run(make_app(settings_args, replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}),
              name=app, route_prefix=f"/{app}")
    url = f"{base_url}/{app}/v1/completions"
    wait_until(lambda: httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=60)
               .status_code == 200, timeout_s=300, what=f"{app} to answer")

    def body(i: int, k: int) -> dict:
        return {"prompt": PROMPTS[(i * 3 + k) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}

    out = {}
    for c in concurrency:
        progress(f"{name}: {c} clients for {seconds:.0f} s")
        with ClosedLoop(url, clients=c, body=body) as load:
            load.wait_for(2 * c)  # warm: every client has an answer, batches have formed
            t0 = time.monotonic()
            time.sleep(seconds)
            t1 = time.monotonic()
        window = [s for s in load.samples if t0 <= s.started and s.finished <= t1]
        tokens = sum(s.completion_tokens for s in window if s.ok)
        out[f"c{c}"] = {"concurrency": c, **latency_summary(window), "tokens_per_s": tokens / (t1 - t0),
                        "requests_per_s": len(window) / (t1 - t0),
                        "mean_completion_tokens": tokens / max(1, sum(s.ok for s in window))}
    serve.delete(app)
    ray.kill(get_controller(app), no_restart=True)
    return out


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when nothing finished inside b's window (a very short run on a loaded machine)."""
    return a / b if b else None


def _print_table(payload: dict) -> None:
    results = payload["results"]
    print(f"\nservice: POST /v1/completions through Serve, 1 replica, max_tokens {payload['max_tokens']}, "
          f"{payload['seconds']:.0f} s per level")
    print(f"  {'mode':9} {'clients':>7} {'tokens/s':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for mode in ("compiled", "eager"):
        for row in results[mode]["service"].values():
            print(f"  {mode:9} {row['concurrency']:7d} {row['tokens_per_s']:9.1f} {row['requests_per_s']:7.1f} "
                  f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['failed']:7d}")
    print(f"\nengine: generation loop in-process, every row {payload['max_tokens']} tokens")
    print(f"  {'mode':9} {'batch':>7} {'tokens/s':>9} {'ms/batch':>9}")
    for mode in ("compiled", "eager"):
        for key, row in results[mode]["engine"].items():
            if key.startswith("batch_"):
                print(f"  {mode:9} {key.removeprefix('batch_'):>7} {row['tokens_per_s']:9.1f} "
                      f"{row['ms_per_batch']:9.1f}")
    print("\ncompiled / eager tokens/s:  " + ",  ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a"
                                                         for k, v in payload["ratios"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the JSON result")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients (default 1 4 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level (default 10)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument("--engine-reps", type=int, default=20, help="timed batches per engine measurement")
    parser.add_argument("--base-model", default="builtin:tiny-llama", help="a Hugging Face model folder or builtin:")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's)")
    parser.add_argument("--compile-mode", default=None, help="default, reduce-overhead (CUDA), ...")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.seconds <= 0:
        parser.error("--concurrency must be >= 1 and --seconds > 0")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for mode, compiled in (("compiled", True), ("eager", False)):
            progress(f"{mode}: engine in-process")
            results[mode] = {"engine": bench_engine(_settings_args(args, cache, compiled), max_tokens=args.max_tokens,
                                                    reps=args.engine_reps)}
        with serve_cluster(cache) as base_url:
            for mode, compiled in (("compiled", True), ("eager", False)):
                progress(f"{mode}: starting the service")
                results[mode]["service"] = bench_service(
                    _settings_args(args, cache, compiled), base_url=base_url, name=mode,
                    concurrency=args.concurrency, seconds=args.seconds, max_tokens=args.max_tokens)
    ratios = {f"service c{c}": _ratio(results["compiled"]["service"][f"c{c}"]["tokens_per_s"],
                                      results["eager"]["service"][f"c{c}"]["tokens_per_s"]) for c in args.concurrency}
    for key in results["compiled"]["engine"]:
        if key.startswith("batch_"):
            ratios[f"engine {key.replace('_', ' ')}"] = _ratio(results["compiled"]["engine"][key]["tokens_per_s"],
                                                               results["eager"]["engine"][key]["tokens_per_s"])
    payload = write_result("serving", args.json, argv, {
        "base_model": args.base_model, "device": args.device, "max_tokens": args.max_tokens, "seconds": args.seconds,
        "results": results, "ratios": ratios})
    _print_table(payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
