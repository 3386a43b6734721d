"""What Ray Serve itself carries on this machine, with no model: ``python -m benchmarks.serve_floor --json PATH``.

The same closed-loop HTTP clients as ``benchmarks.serving`` (whole answers, ``--clients`` at a time) against, taking
turns for ``--rounds`` rounds in one Serve cluster:

- **direct**: Serve's HTTP proxy -> one deployment (1 CPU) that answers a fixed OpenAI-shaped completion of
  ``--max-tokens`` tokens at once: the floor of one hop;
- **chain**: the proxy -> a front deployment -> the answering deployment through a handle, hotswap's shape
  (``Ingress`` -> ``ModelReplica``) with nothing inside either;
- **hotswap**: the service itself (the built-in tiny model, compiled, 2 adapter slots, one replica of 1 CPU);

and, in this process before the cluster starts, the in-process engine at ``--max-batch-size`` rows in flight with
the replica's torch threads (as ``benchmarks.serving`` measures it). All deployments get the fast-path settings the
service's own get (``deployments.app.SERVE_FAST_PATH_ENV``).

What it answers: the requests a second that the service's shape could carry if the model cost nothing, and so the
highest ``service / engine`` ratio (``benchmarks.serving``'s) that shape can reach on this machine: the chain's
requests/s times the service's tokens per request, over the engine's tokens/s. The model's own CPU comes on top.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._cluster import (
    add_serve_env_argument,
    progress,
    serve_cluster,
    serve_env,
    wait_until,
    write_result,
)
from benchmarks.serving import (
    _InProcess,
    _prompt,
    _replica_threads,
    _settings_args,
    _start_app,
    _stop_app,
    _summary,
    _window,
)

_TEXT = " floor"  # one "token" of the fixed answer


def _answer(body: dict) -> dict:
    n = int(body.get("max_tokens", 16))
    return {"id": "cmpl-floor", "object": "text_completion", "created": int(time.time()), "model": "floor",
            "choices": [{"index": 0, "text": _TEXT * n, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}}


def _deployments():
    """The two floor apps (built here: Serve pickles the classes with the app)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # as many requests in flight as the service's deployments allow (Serve's default of 5 would queue 11 of 16
    # clients in the router: a floor held down by a cap the service does not have)
    @serve.deployment(name="FloorAnswer", max_ongoing_requests=256)
    class Answer:
        async def __call__(self, request: Request) -> JSONResponse:
            return JSONResponse(_answer(await request.json()), headers={"x-adapter-uri": "floor"})

        async def complete(self, body: dict) -> dict:
            return _answer(body)

    @serve.deployment(name="FloorFront", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
    class Front:
        def __init__(self, answer) -> None:
            self.answer = answer

        async def __call__(self, request: Request) -> JSONResponse:
            out = await self.answer.complete.remote(await request.json())
            return JSONResponse(out, headers={"x-adapter-uri": "floor"})

    return Answer, Front


def _start_floor(name: str, base_url: str) -> tuple[str, str]:
    import httpx
    from ray import serve

    from deployments.app import _fast_path

    Answer, Front = _deployments()
    answer = _fast_path(Answer, {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}})
    app_graph = answer.bind() if name == "direct" else _fast_path(Front, {}).bind(answer.bind())
    app = f"bench-floor-{name}"
    serve.run(app_graph, name=app, route_prefix=f"/{app}")
    url = f"{base_url}/{app}/v1/completions"
    wait_until(lambda: httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=60).status_code == 200,
               timeout_s=120, what=f"{app} to answer")
    return app, url


def _measure(url: str, *, clients: int, seconds: float, max_tokens: int) -> dict:
    def body(i: int, k: int) -> dict:
        return {"prompt": _prompt(i, k), "max_tokens": max_tokens, "temperature": 0}

    window, t0, t1 = _window(url, clients=clients, body=body, seconds=seconds)
    return _summary(window, t1 - t0, stream=False, tokens=None, max_tokens=max_tokens)  # whole answers: no _Tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the JSON result")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per window (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the configurations take turns (default 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the replica's and the engine's rows (8)")
    parser.add_argument("--engine-seconds", type=float, default=4.0, help="seconds per engine round (default 4)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="torch threads of the in-process engine (default: OMP_NUM_THREADS, --serve-env's first, "
                             "else 1: the replica's under Ray)")
    add_serve_env_argument(parser)
    args = parser.parse_args(argv)
    env = serve_env(parser, args)
    if args.engine_threads is None:  # the replica's, with --serve-env's OMP_NUM_THREADS if it sets one
        args.engine_threads = _replica_threads(env)
    if min(args.clients, args.rounds, args.engine_threads, args.max_tokens, args.max_batch_size) < 1 or min(
            args.seconds, args.engine_seconds) <= 0:
        parser.error("--clients, --rounds, --engine-threads, --max-tokens and --max-batch-size must be >= 1, "
                     "--seconds and --engine-seconds > 0")
    # what benchmarks.serving's settings builder reads
    settings = argparse.Namespace(initial_adapter="builtin:demo", base_model="builtin:tiny-llama", device="cpu",
                                  max_batch_size=args.max_batch_size, max_seq_len=256, dtype=None,
                                  stream_interval_ms=None, compile_mode=None, target_modules=None, max_rank=None)
    import torch

    torch.set_num_threads(args.engine_threads)
    names = ["direct", "chain", "hotswap"]
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        progress("engine: building it in-process (compiled, 2 adapter slots)")
        engine = _InProcess(_settings_args(settings, cache, True), max_tokens=args.max_tokens)
        try:
            for i in range(args.rounds):
                progress(f"engine in-process, round {i + 1} of {args.rounds}")
                engine.measure(args.engine_seconds)
            engine_result = engine.result()
        finally:
            engine.close()
        with serve_cluster(cache, env=env) as base_url:
            apps = {}
            for name in names:
                progress(f"{name}: starting")
                apps[name] = (_start_app(_settings_args(settings, cache, True), "floor", base_url)
                              if name == "hotswap" else _start_floor(name, base_url))
            for i in range(args.rounds):
                for name in names:
                    progress(f"{name}: {args.clients} clients for {args.seconds:.0f} s, round {i + 1} of "
                             f"{args.rounds}")
                    rounds[name].append(_measure(apps[name][1], clients=args.clients, seconds=args.seconds,
                                                 max_tokens=args.max_tokens))
            _stop_app(apps["hotswap"][0])
    failed = {n: sum(r["failed"] for r in rounds[n]) for n in names}
    if any(max(r["requests_per_s"] for r in rounds[n]) == 0 for n in names):  # nothing to take a ratio of
        write_result("serve_floor", args.json, argv, {"serve_env": env, "rounds": rounds, "failed_requests": failed})
        print(f"every request of a configuration failed ({failed}); see {args.json}", file=sys.stderr)
        return 1
    batch = f"batch_{args.max_batch_size}"
    engine_best = engine_result[batch]["max_tokens_per_s"]
    best = {n: max(rounds[n], key=lambda r: r["requests_per_s"]) for n in names}
    tokens_per_request = best["hotswap"]["mean_completion_tokens"]
    figures = {
        "engine_best_tokens_per_s": engine_best,
        "hotswap_tokens_per_request": tokens_per_request,
        # the ratio benchmarks.serving reports, for the service measured here
        "service_over_engine": best["hotswap"]["tokens_per_s"] / engine_best,
        # the highest that ratio could be if the model cost no CPU at all: the floor's requests at the service's
        # tokens per request
        "direct_ceiling_over_engine": best["direct"]["requests_per_s"] * tokens_per_request / engine_best,
        "chain_ceiling_over_engine": best["chain"]["requests_per_s"] * tokens_per_request / engine_best,
        "hotswap_over_chain_requests": best["hotswap"]["requests_per_s"] / best["chain"]["requests_per_s"],
    }
    figures["failed_requests"] = failed  # a round with failures measured something else: say so, loudly
    write_result("serve_floor", args.json, argv, {
        "serve_env": env, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size, "engine_threads": args.engine_threads,
        "engine": engine_result, "rounds": rounds, "figures": figures})
    print(f"\n{args.clients} clients, whole answers of {args.max_tokens} tokens, best of {args.rounds} rounds "
          f"(every round in the JSON)")
    print(f"{'':10} {'req/s':>8} {'median':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for name in names:
        med = statistics.median(r["requests_per_s"] for r in rounds[name])
        r = best[name]
        print(f"{name:10} {r['requests_per_s']:8.1f} {med:8.1f} {r['p50_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f} "
              f"{sum(x['failed'] for x in rounds[name]):7d}")
    print(f"\nengine in-process, {args.max_batch_size} in flight, {args.engine_threads} thread(s): "
          f"{engine_best:.1f} tokens/s (best round)")
    print(f"service / engine: {figures['service_over_engine']:.2f}x; with no model at all, the chain's requests "
          f"at {tokens_per_request:.1f} tokens each would be {figures['chain_ceiling_over_engine']:.2f}x "
          f"(direct: {figures['direct_ceiling_over_engine']:.2f}x)")
    if any(failed.values()):
        print(f"\nWARNING: failed requests {failed}: the figures above count only the answered ones and are not a "
              "floor; see the JSON's rounds")
    print(f"\nwrote {args.json}")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
