"""A new adapter version across replicas under load: ``python -m benchmarks.rollout --json PATH``.

For N = 2 and 3 replicas (tiny built-in model, CPU) and a closed-loop load of 4 clients, side
by side in one run:

(a) ``hotswap roll`` of a new version from S3 (a real S3 server on 127.0.0.1), repeated with a
    fresh version each time (each roll fetches, validates and stages a version never seen);
(b) what a user does with plain Ray Serve: redeploy the app with the new ``initial_adapter``;
    Serve replaces the replicas, which load the model and compile again.

Reported: time from the command to every replica serving the new version, failed requests,
p50/p99 latency in steady state vs during (a) and during (b), and for every swap of (a) what
the replica spent on it (``hotswap status``: ``last_drain_ms``, ``last_swap_ms``,
``last_smoke_ms``). With ``adapter_slots: 2`` (the default) a replica loads the slot no request
reads, so a swap that finds that slot free waits for nothing: its drain is 0 ms. Also the CPU
a roll costs, per group of this benchmark's processes (controller, replicas, ingress, proxy,
the S3 stand-in, Ray's own, this process's load clients), beyond each group's steady-state
rate. The control plane's sum is what a roll takes from the cores that serve requests; on a
saturated machine the serving processes' own "extra" is negative (they are the ones starved).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._cluster import (
    PROMPTS,
    CpuMeter,
    add_serve_env_argument,
    local_s3,
    progress,
    serve_cluster,
    serve_env,
    wait_until,
    write_result,
)
from benchmarks.load import ClosedLoop, Sample, latency_summary

BUCKET = "bench-rollout"


def _versions(cache: Path, count: int) -> list[tuple[str, str]]:
    """``count`` distinct adapters for the built-in model, pushed to S3; (uri, sha256) each."""
    import hashlib

    from hotswap.builtin import materialize_builtin_model, write_random_adapter
    from hotswap.settings import HotswapSettings
    from hotswap.store import AdapterFetcher, make_s3_client

    base = materialize_builtin_model("tiny-llama", cache_dir=cache)
    make_s3_client(connect_timeout_s=5, read_timeout_s=30).create_bucket(Bucket=BUCKET)
    fetcher = AdapterFetcher.from_settings(HotswapSettings(cache_dir=cache))
    out = []
    for i in range(count):
        folder = write_random_adapter(base, cache / "bench-adapters" / f"v{i}", r=4 + 4 * (i % 4),
                                      lora_alpha=8 + i, target_modules=("q_proj", "v_proj", "o_proj"), seed=500 + i)
        uri = f"s3://{BUCKET}/v{i}"
        fetcher.push(folder, uri)
        out.append((uri, hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()))
    return out


def _overlapping(samples: list[Sample], windows: list[tuple[float, float]]) -> list[Sample]:
    return [s for s in samples if any(s.started < t1 and s.finished > t0 for t0, t1 in windows)]


def _live_on(client, sha: str, n: int) -> bool:
    live = [r for r in client.status()["replicas"] if r["live"]]
    return len(live) == n and all(r["adapter_sha256"] == sha for r in live)


# the processes whose CPU a roll is charged for: (group, a substring of the command line); the first match wins, and
# this benchmark's other descendants (Ray's log monitor, idle workers, ...) are "ray_other"
# what a roll adds to the machine: on a saturated one the serving processes (replicas, ingress, proxy, the load
# clients) get less CPU during a roll, not more, so their "extra" is negative and is not a cost
_CONTROL_PLANE = ("controller", "serve_controller", "s3_stand_in", "gcs", "raylet", "dashboard_agent", "ray_other")


def _cpu_per_roll(steady: tuple[dict, dict, float], rolls: list[tuple[dict, dict, float]]) -> dict:
    """Per group: CPU ms per roll, and what is beyond the group's steady-state rate over the roll's duration; and the
    control plane's extra, summed (see ``_CONTROL_PLANE``)."""
    (s0, s1, steady_s), n = steady, len(rolls)
    out = {}
    for group in s0:
        rate = (s1[group] - s0[group]) / steady_s  # CPU seconds per second in steady state
        spent = sum(b[group] - a[group] for a, b, _ in rolls)
        beyond = sum(b[group] - a[group] - rate * dt for a, b, dt in rolls)
        out[group] = {"steady_cores": rate, "ms_per_roll": spent / n * 1e3, "extra_ms_per_roll": beyond / n * 1e3}
    out["control_plane_extra_ms_per_roll"] = sum(v["extra_ms_per_roll"] for g, v in out.items() if g in _CONTROL_PLANE)
    return out


def bench_replicas(n: int, *, base_url: str, cache: Path, versions: list[tuple[str, str]], rolls: int, clients: int,
                   steady_s: float, max_tokens: int, adapter_slots: int = 2) -> dict:
    import ray
    from ray import serve

    from deployments.app import make_app
    from hotswap.client import HotswapClient
    from hotswap.controller import get_controller

    app = f"bench-rollout-n{n}"
    options = {"num_replicas": n, "ray_actor_options": {"num_cpus": 0.5}}
    args = {"initial_adapter": versions[0][0], "cache_dir": str(cache), "state_uri": str(cache / f"{app}-a.json"),
            "adapter_slots": adapter_slots}
    progress(f"N={n}: starting {n} compiled replicas on {versions[0][0]}")
    serve.run(make_app(args, replica_options=options), name=app, route_prefix=f"/{app}")
    client = HotswapClient(app)
    wait_until(lambda: _live_on(client, versions[0][1], n), timeout_s=300, what=f"{n} replicas")

    def body(i: int, k: int) -> dict:
        return {"prompt": PROMPTS[(i * 7 + k) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}

    with ClosedLoop(f"{base_url}/{app}/v1/completions", clients=clients, body=body) as load:
        load.wait_for(4 * clients)  # warm: every client has answers, batches have formed
        progress(f"N={n}: steady state for {steady_s:.0f} s")
        cpu = CpuMeter()
        cpu_steady0 = cpu.read()
        steady_window = (time.monotonic(), time.monotonic() + steady_s)
        time.sleep(steady_s)
        cpu_steady = (cpu_steady0, cpu.read(), time.monotonic() - steady_window[0])

        progress(f"N={n}: (a) {rolls} rolls, each to a new version from S3")
        windows, roll_s, swap_phase_ms, prepare_windows, swap_windows = [], [], [], [], []
        per_replica: dict[str, list[float]] = {"drain_ms": [], "copy_ms": [], "smoke_ms": []}
        swaps = []  # one row per replica and roll
        swap_counts = {r["id"]: r.get("swaps") or 0 for r in client.status()["replicas"] if r["live"]}
        cpu_rolls = []
        for j in range(rolls):
            uri, sha = versions[1 + j]
            c0 = cpu.read()
            t0 = time.monotonic()
            result = client.roll(uri)
            t1 = time.monotonic()
            cpu_rolls.append((c0, cpu.read(), t1 - t0))
            assert len(result["swapped"]) == n and _live_on(client, sha, n), result
            windows.append((t0, t1))
            roll_s.append(t1 - t0)
            swap_phase_ms.append(result["ms"])  # the controller's time from first assignment to last ack
            prepare_windows.append((t0, t1 - result["ms"] / 1e3))
            swap_windows.append((t1 - result["ms"] / 1e3, t1))
            for r in client.status()["replicas"]:  # what each replica's last swap (this roll's) spent, by phase
                if r["live"]:
                    per_replica["drain_ms"].append(r.get("last_drain_ms") or 0.0)
                    per_replica["copy_ms"].append(r.get("last_swap_ms") or 0.0)
                    per_replica["smoke_ms"].append(r.get("last_smoke_ms") or 0.0)
                    count = r.get("swaps") or 0
                    swaps.append({"roll": j + 1, "replica": r["id"], "drain_ms": r.get("last_drain_ms"),
                                  "copy_ms": r.get("last_swap_ms"), "smoke_ms": r.get("last_smoke_ms"),
                                  # the figures are this roll's when the replica's swap count went up by one
                                  "this_roll": count == swap_counts.get(r["id"], count - 1) + 1,
                                  "slots": r.get("slots")})
                    swap_counts[r["id"]] = count
            progress(f"N={n}:   roll {j + 1}/{rolls} to {uri}: {(t1 - t0) * 1e3:.0f} ms")
            time.sleep(1.0)
        roll_phase = (windows[0][0], time.monotonic())

        # the same through the console script, as a user types it (adds the CLI's start and Ray connect)
        uri, sha = versions[1 + rolls]
        address = ray.get_runtime_context().gcs_address
        t0 = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "hotswap.cli", "roll", uri, "--app", app], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": address})
        cli_s = time.monotonic() - t0
        if cli.returncode != 0:
            raise RuntimeError(f"hotswap roll failed: {cli.stderr}")
        windows.append((t0, time.monotonic()))
        time.sleep(2.0)

        progress(f"N={n}: (b) Serve redeploy with the new initial_adapter (replicas restart and compile)")
        uri, sha = versions[2 + rolls]
        ray.kill(get_controller(app), no_restart=True)  # no hotswap: the config's initial_adapter decides
        redeploy_args = {**args, "initial_adapter": uri, "state_uri": str(cache / f"{app}-b.json")}
        t0 = time.monotonic()
        serve.run(make_app(redeploy_args, replica_options=options), name=app, route_prefix=f"/{app}")
        client = HotswapClient(app)
        wait_until(lambda: _live_on(client, sha, n), timeout_s=600, what=f"{n} redeployed replicas")
        t1 = time.monotonic()
        redeploy_window = (t0, t1)
        time.sleep(2.0)
    samples = load.samples
    serve.delete(app)
    ray.kill(get_controller(app), no_restart=True)

    steady = [s for s in samples if steady_window[0] <= s.started and s.finished <= steady_window[1]]
    during_roll = _overlapping(samples, windows[:-1])
    during_redeploy = _overlapping(samples, [redeploy_window])
    roll_phase_samples = [s for s in samples if roll_phase[0] <= s.started < roll_phase[1]]
    redeploy_s = t1 - t0
    result = {
        "replicas": n,
        "adapter_slots": adapter_slots,
        "clients": clients,
        "max_tokens": max_tokens,
        "steady": latency_summary(steady),
        "hotswap_roll": {
            "time_to_new_version_s": {"median": statistics.median(roll_s), "max": max(roll_s), "n": len(roll_s)},
            # the rest of a roll is fetching from S3, validating and staging the new version, once
            "swap_phase_ms": {"median": statistics.median(swap_phase_ms), "max": max(swap_phase_ms)},
            # per replica and swap: waiting for the batch in flight, the copy, the smoke check
            "replica_phases_ms": {k: {"median": statistics.median(v), "max": max(v)} for k, v in per_replica.items()},
            "swaps": swaps,
            "drain_ms_max": max(per_replica["drain_ms"]),
            # the engine reports a drain of exactly 0 when the slot it loads was free (no row read it)
            "swaps_that_waited": sum((s["drain_ms"] or 0.0) > 0 for s in swaps),
            # swaps after which the previous version's slot still had rows finishing on it (what a drain would wait
            # for), as the replica reported right after the swap
            "swaps_with_rows_on_old_slot": sum(any(not x["active"] and x["rows"] for x in s["slots"] or ())
                                               for s in swaps),
            "during_prepare": latency_summary(_overlapping(samples, prepare_windows)),
            "during_swaps": latency_summary(_overlapping(samples, swap_windows)),
            "cli_roll_s": cli_s,
            "during": latency_summary(during_roll),
            "failed_in_roll_phase": sum(not s.ok for s in roll_phase_samples),
            # CPU per roll by process group, and beyond each group's steady-state rate: what a roll costs the cores
            # every process shares (/proc, read before and after each roll)
            "cpu": _cpu_per_roll(cpu_steady, cpu_rolls),
            "requests_in_roll_phase": len(roll_phase_samples),
        },
        "serve_redeploy": {
            "time_to_new_version_s": redeploy_s,
            "during": latency_summary(during_redeploy),
        },
        "errors": sorted({s.error[:200] for s in samples if not s.ok})[:10],
    }
    steady_p99 = result["steady"]["p99_ms"]
    result["ratios"] = {
        "redeploy_over_roll": redeploy_s / statistics.median(roll_s),
        "redeploy_over_slowest_roll": redeploy_s / max(roll_s),
        "redeploy_over_cli_roll": redeploy_s / cli_s,
        "p99_during_roll_over_steady": (result["hotswap_roll"]["during"]["p99_ms"] / steady_p99)
        if steady_p99 else None,
        "p99_during_redeploy_over_steady": ((result["serve_redeploy"]["during"]["p99_ms"] or 0) / steady_p99)
        if steady_p99 else None,
    }
    return result


def _print_table(results: list[dict]) -> None:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    for r in results:
        a, b, s = r["hotswap_roll"], r["serve_redeploy"], r["steady"]
        print(f"\nN={r['replicas']} replicas ({r['adapter_slots']} adapter slots), {r['clients']} closed-loop "
              f"clients, max_tokens {r['max_tokens']}")
        print(f"  {'phase':34} {'to new version':>15} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"  {'steady state':34} {'':>15} {s['requests']:9d} {s['failed']:7d} {ms(s['p50_ms']):>8} "
              f"{ms(s['p99_ms']):>8}")
        t = a["time_to_new_version_s"]
        print(f"  {'(a) hotswap roll (RPC), median':34} {t['median'] * 1e3:12.0f} ms {a['during']['requests']:9d} "
              f"{a['during']['failed']:7d} {ms(a['during']['p50_ms']):>8} {ms(a['during']['p99_ms']):>8}")
        print(f"  {'    of which swapping replicas':34} {a['swap_phase_ms']['median']:12.0f} ms  (the rest: fetch, "
              "validate, stage)")
        ph = a["replica_phases_ms"]
        print(f"  {'    per replica: drain / copy / smoke':34} {ph['drain_ms']['median']:.3f} / "
              f"{ph['copy_ms']['median']:.2f} / {ph['smoke_ms']['median']:.1f} ms (medians)")
        print(f"  {'    drain, every swap':34} max {a['drain_ms_max']:.3f} ms over {len(a['swaps'])} swaps; "
              f"{a['swaps_that_waited']} waited for rows on the slot (drain > 0); after "
              f"{a['swaps_with_rows_on_old_slot']} the old slot still had rows finishing on it")
        for key, label in (("during_prepare", "    p99 during fetch+validate+stage"),
                           ("during_swaps", "    p99 during the swaps")):
            print(f"  {label:34} {'':>15} {a[key]['requests']:9d} {a[key]['failed']:7d} "
                  f"{ms(a[key]['p50_ms']):>8} {ms(a[key]['p99_ms']):>8}")
        print(f"  {'    slowest roll / CLI roll':34} {t['max'] * 1e3:9.0f} / {a['cli_roll_s']:.1f} s")
        c = a["cpu"]
        groups = sorted((g for g in c if g in _CONTROL_PLANE), key=lambda g: -c[g]["extra_ms_per_roll"])
        print(f"  {'    control plane CPU per roll':34} {c['control_plane_extra_ms_per_roll']:.0f} ms beyond steady: "
              + ", ".join(f"{g} {c[g]['extra_ms_per_roll']:.0f}" for g in groups
                          if abs(c[g]["extra_ms_per_roll"]) >= 0.5))
        print(f"  {'(b) Serve redeploy':34} {b['time_to_new_version_s']:13.1f} s {b['during']['requests']:9d} "
              f"{b['during']['failed']:7d} {ms(b['during']['p50_ms']):>8} {ms(b['during']['p99_ms']):>8}")
        q = r["ratios"]
        print(f"  redeploy / roll = {q['redeploy_over_roll']:.0f}x (slowest roll "
              f"{q['redeploy_over_slowest_roll']:.0f}x, CLI {q['redeploy_over_cli_roll']:.1f}x); "
              "p99 during roll / steady = "
              f"{q['p99_during_roll_over_steady']:.2f}x; failed in the whole roll phase: "
              f"{a['failed_in_roll_phase']} of {a['requests_in_roll_phase']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the JSON result")
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 3], help="replica counts (default 2 3)")
    # 30 rolls: about 400 requests overlap them under 4 clients, so their p99 is not just the second-worst request
    # (10 rolls gave about 130, and 3-replica ratios of 1.19-1.40x where 30 gave 1.09x; BENCHMARKS.md section 2)
    parser.add_argument("--rolls", type=int, default=30, help="rolls per replica count, each a new version "
                        "(default 30)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients (default 4)")
    parser.add_argument("--steady-s", type=float, default=20.0,
                        help="seconds of steady state measured first (default 20: its p99 is over some 600 requests)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per request (default 8)")
    parser.add_argument("--adapter-slots", type=int, choices=(1, 2), default=2,
                        help="the replicas' adapter_slots (default 2; 1 drains on every swap)")
    add_serve_env_argument(parser)
    args = parser.parse_args(argv)
    env = serve_env(parser, args)
    if args.rolls < 1 or args.clients < 1 or min(args.replicas) < 1:
        parser.error("--rolls, --clients and --replicas must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        with local_s3():
            progress("writing adapter versions to S3")
            versions = _versions(cache, args.rolls + 3)
            with serve_cluster(cache, env=env) as base_url:
                results = [bench_replicas(n, base_url=base_url, cache=cache, versions=versions, rolls=args.rolls,
                                          clients=args.clients, steady_s=args.steady_s, max_tokens=args.max_tokens,
                                          adapter_slots=args.adapter_slots)
                           for n in args.replicas]
    write_result("rollout", args.json, argv, {"serve_env": env, "results": results})
    _print_table(results)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
