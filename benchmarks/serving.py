"""The continuous-batching replica in service and in-process: ``python -m benchmarks.serving --json PATH``.

Side by side in one run, the built-in tiny model on CPU by default, every configuration with the
same ``max_batch_size`` (default 8, so that the mixed workload below has rows to spare):

- **engine**: the replica's scheduler called in-process (no HTTP, no Serve), with as many torch threads as
  the replica has (``--engine-threads``; Ray gives an actor of 1 CPU ``OMP_NUM_THREADS=1`` unless set): a
  closed loop keeps 1 and then ``max_batch_size`` requests in flight through ``engine.submit`` (each finished request
  is replaced at once by the next), and the tokens generated inside the measured window are
  counted. The same prompts and sampling as the service's clients. For ``compile: true`` with 2
  adapter slots (the service's configuration), with 1 slot (what the second slot costs per step)
  and, unless ``--no-eager``, ``compile: false``; the configurations take turns for
  ``--engine-rounds`` rounds (median reported), and the service's configuration is measured once
  more after the service. The service / engine ratio uses the engine's best round.
- **service**: ``POST /v1/completions`` through Serve's proxy and the ingress to one replica (1 CPU),
  closed-loop clients at each ``--concurrency`` level, non-streaming and streaming
  (``"stream": true``, server-sent events read as they arrive): tokens/s, p50/p99 latency, and for
  streams the time to the first text. A streaming client stops at ``data: [DONE]``, as openai-python's
  synchronous client does, which closes its connection; at the top level the streams run once more with clients that
  read each response to its end and so keep their connection (``keep-conn``).
- **mixed**: short requests (``--short-tokens``, non-streaming, ``--short-clients`` clients) alone, then
  the same under ``--long-streams`` streaming clients of ``--long-tokens`` tokens each: their p50.
- unless ``--no-eager``, the service again with ``compile: false`` (non-streaming levels): what compile buys.

Throughput counts the tokens of the requests that *finish* inside the measured window (a closed
loop in steady state); latency percentiles are over the same requests. A streamed answer carries no
token count, so each (prompt, max_tokens) is first asked once without streaming (greedy: the same
tokens) and a streamed answer with the same text counts that many tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._cluster import (
    PROMPTS,
    CpuMeter,
    add_serve_env_argument,
    progress,
    serve_cluster,
    serve_env,
    wait_until,
    write_result,
)
from benchmarks.load import ClosedLoop, Sample, latency_summary, percentile


def _settings_args(args, cache: Path, compiled: bool, *, adapter_slots: int = 2) -> dict:
    adapter = Path(args.initial_adapter)
    local = adapter.is_dir()  # a local folder: the engine reads adapters under its store root only
    out = {"base_model": args.base_model, "initial_adapter": str(adapter.resolve()) if local else args.initial_adapter,
           "cache_dir": str(cache),
           "compile": compiled, "device": args.device, "max_batch_size": args.max_batch_size,
           "max_seq_len": args.max_seq_len, "adapter_slots": adapter_slots}
    if args.dtype:
        out["dtype"] = args.dtype
    if args.stream_interval_ms is not None:
        out["stream_interval_ms"] = args.stream_interval_ms
    if compiled and args.compile_mode:
        out["compile_mode"] = args.compile_mode
    if args.target_modules:
        out["target_modules"] = args.target_modules
    if args.max_rank:
        out["max_rank"] = args.max_rank
    if local:
        out["local_store_root"] = str(adapter.resolve().parent)
    return out


def _replica_threads(env: dict[str, str] | None = None) -> int:
    """The torch threads of the service's 1-CPU replica: ``OMP_NUM_THREADS`` where the environment Ray starts from
    sets it (this process's, with ``--serve-env``'s ``env`` over it), else the 1 Ray sets for it."""
    try:
        return max(1, int({**os.environ, **(env or {})}.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _prompt(i: int, k: int) -> str:
    """Client ``i``'s ``k``-th prompt (the engine's closed loop uses the same sequence)."""
    return PROMPTS[(i * 3 + k) % len(PROMPTS)]


# -- in-process ----------------------------------------------------------------------------------------------


class _EngineLoop:
    """``rows`` closed-loop requests through ``engine.submit``; every token's time is recorded."""

    def __init__(self, engine, rows: int, params) -> None:
        from hotswap.generation import TokenEvent
        from hotswap.scheduler import Failed, Finished

        self._types = (TokenEvent, Finished, Failed)
        self.engine = engine
        self.params = params
        self.rows = rows
        self.token_times: list[float] = []
        self.finished = 0
        self.failed: list[BaseException] = []
        self._stop = False
        self._in_flight = 0
        self._lock = threading.Condition()
        self._ids = {p: engine.encode(p) for p in PROMPTS}
        self._k = [0] * rows

    def _submit(self, i: int) -> None:
        token, finished, failed = self._types
        prompt = _prompt(i, self._k[i])
        self._k[i] += 1
        times: list[float] = []

        def on_event(event) -> None:
            if isinstance(event, token):
                times.append(time.perf_counter())
            elif isinstance(event, (finished, failed)):
                with self._lock:
                    if isinstance(event, finished):
                        # one TokenEvent per token, plus one for an EOS that ends the answer (not a token)
                        self.token_times.extend(times[:event.completion.completion_tokens])
                        self.finished += 1
                    else:
                        self.failed.append(event.error)
                    again = not self._stop and not isinstance(event, failed)
                    if not again:
                        self._in_flight -= 1
                    self._lock.notify_all()
                if again:
                    self._submit(i)

        self.engine.submit(self._ids[prompt], self.params, on_event=on_event)

    def run(self, seconds: float) -> dict:
        steps = self.engine.scheduler.steps
        scheduler = self.engine.scheduler
        with self._lock:
            self._in_flight = self.rows
        for i in range(self.rows):
            self._submit(i)
        with self._lock:  # warm: every row has finished a request
            self._lock.wait_for(lambda: self.finished >= 2 * self.rows or self.failed, timeout=120)
        before, stats_before = dict(steps), scheduler.step_stats()
        t0 = time.perf_counter()
        time.sleep(seconds)
        t1 = time.perf_counter()
        after, stats_after = dict(steps), scheduler.step_stats()
        with self._lock:
            self._stop = True
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=120)
        if self.failed:
            raise RuntimeError(f"{len(self.failed)} in-process requests failed: {self.failed[0]!r}")
        tokens = sum(t0 <= t <= t1 for t in self.token_times)
        decode = after["decode"] - before["decode"]
        prefill = after["prefill"] - before["prefill"]
        return {"rows_in_flight": self.rows, "tokens_per_s": tokens / (t1 - t0), "tokens": tokens,
                "seconds": t1 - t0, "decode_steps": decode, "prefill_steps": prefill,
                "ms_per_step": (t1 - t0) * 1e3 / max(1, decode + prefill),
                # every step makes tokens: a prefill step carries the generating rows' too
                "tokens_per_step": tokens / (decode + prefill) if decode + prefill else None,
                "step": (stats_after - stats_before).per_step()}


class _InProcess:
    """One engine built in this process, measured in rounds (kept alive between them: its scheduler sleeps)."""

    def __init__(self, settings_args: dict, *, max_tokens: int) -> None:
        from hotswap.adapters import model_spec_for, prepare_adapter
        from hotswap.engine import SwapEngine
        from hotswap.generation import SamplingParams
        from hotswap.settings import HotswapSettings

        self.settings = settings = HotswapSettings.from_args(settings_args)
        started = time.perf_counter()
        self.engine = SwapEngine.build(settings)
        self.build_s = time.perf_counter() - started
        self.engine.apply(prepare_adapter(settings.initial_adapter, settings=settings, spec=model_spec_for(settings),
                                          dtype=self.engine.dtype))
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0)  # what the service's clients ask for
        self.rounds: dict[str, list[dict]] = {f"batch_{rows}": [] for rows in sorted({1, settings.max_batch_size})}

    def measure(self, seconds: float) -> None:
        """One round: tokens/s with 1 and with ``max_batch_size`` requests in flight."""
        for key, rounds in self.rounds.items():
            rounds.append(_EngineLoop(self.engine, int(key.removeprefix("batch_")), self.params).run(seconds))

    def result(self) -> dict:
        """Per level the median over the rounds (and the best round, and every round under ``rounds``)."""
        out = {"adapter_slots": self.settings.adapter_slots, "compile": self.settings.compile, "build_s": self.build_s}
        for key, rounds in self.rounds.items():
            per_step = [r["tokens_per_step"] for r in rounds if r["tokens_per_step"] is not None]
            out[key] = {"rows_in_flight": rounds[0]["rows_in_flight"],
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
                        "max_tokens_per_s": max(r["tokens_per_s"] for r in rounds),
                        "ms_per_step": statistics.median(r["ms_per_step"] for r in rounds),
                        "tokens_per_step": statistics.median(per_step) if per_step else None,
                        "rounds": rounds}
        out["compiled_graphs"] = self.engine.compiled_graphs
        return out

    def close(self) -> None:
        self.engine.close()


# -- through the service -------------------------------------------------------------------------------------


def _finished_in(samples: list[Sample], t0: float, t1: float) -> list[Sample]:
    return [s for s in samples if t0 <= s.finished <= t1]


class _Tokens:
    """Completion tokens per (prompt, max_tokens), from one non-streaming answer each (greedy: deterministic)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.known: dict[tuple[str, int], tuple[str, int, str]] = {}
        self.mismatches = 0

    def learn(self, prompt: str, max_tokens: int) -> tuple[str, int, str]:
        import httpx

        key = (prompt, max_tokens)
        if key not in self.known:
            r = httpx.post(self.url, json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=120)
            r.raise_for_status()
            payload = r.json()
            choice = payload["choices"][0]
            self.known[key] = (choice["text"], payload["usage"]["completion_tokens"], choice["finish_reason"])
        return self.known[key]

    def count(self, samples: list[Sample], max_tokens: int) -> list[Sample]:
        """The streamed samples with ``completion_tokens`` filled in."""
        from dataclasses import replace

        out = []
        for s in samples:
            if s.ok:
                text, tokens, _ = self.learn(s.prompt, max_tokens)
                if s.text != text:  # should not happen (greedy, rows independent): count chunks instead
                    self.mismatches += 1
                    tokens = s.chunks
                s = replace(s, completion_tokens=tokens)
            out.append(s)
        return out


def _window(url: str, *, clients: int, body, seconds: float, stream: bool = False, warm: int = 2,
            read_to_end: bool = False, mark=None) -> tuple[list[Sample], float, float]:
    """Closed-loop clients, warmed up (``warm`` answers per client), then ``seconds`` measured: the requests that
    finished in the window, and its start and end. ``mark`` (if given) is called at the start and at the end."""
    with ClosedLoop(url, clients=clients, body=body, stream=stream, read_to_end=read_to_end) as load:
        load.wait_for(warm * clients, timeout_s=300)
        if mark is not None:
            mark()
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        if mark is not None:
            mark()
    return _finished_in(load.samples, t0, t1), t0, t1


def _level(url: str, *, clients: int, seconds: float, body, stream: bool, tokens: _Tokens, max_tokens: int,
           what: str, read_to_end: bool = False, replica=None, meter: CpuMeter | None = None) -> dict:
    """One level; with ``replica`` (a handle) also where the replica's scheduler spent the window (``step``), with
    ``meter`` the cores each group of processes used in it (``cores``)."""
    how = " that read each response to its end (one connection each)" if read_to_end else ""
    progress(f"{what}: {clients} {'streaming ' if stream else ''}clients{how} for {seconds:.0f} s")
    readings: list = []
    cpu: list = []

    def mark() -> None:
        if meter is not None:
            cpu.append(_cpu_reading(meter))
        if replica is not None:
            readings.append(_replica_step_stats(replica))

    window, t0, t1 = _window(url, clients=clients, body=body, seconds=seconds, stream=stream,
                             read_to_end=read_to_end, mark=mark if replica is not None or meter is not None else None)
    extra = {"concurrency": clients, "stream": stream, "read_to_end": read_to_end}
    if readings:
        extra["step"] = _step_window(readings, what=f"the {clients}-client level")
    if cpu:
        extra["cores"] = _cores(*cpu)
    return _summary(window, t1 - t0, stream=stream, tokens=tokens, max_tokens=max_tokens, extra=extra)


def _cpu_reading(meter: CpuMeter) -> tuple[float, dict[str, float], float]:
    """(when, CPU seconds per group of the benchmark's processes, the whole machine's busy CPU seconds)."""
    import psutil

    t = psutil.cpu_times()  # guest time is inside user and nice already (as psutil's own busy figure has it)
    busy = sum(t) - t.idle - sum(getattr(t, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
    return time.monotonic(), meter.read(), busy


def _cores(first: tuple, last: tuple) -> dict:
    """Cores used between two readings: per group, in all (``total``), and by every process on the machine
    (``machine``, of ``os.cpu_count()``), so a level shows whether the cores or one process ran out."""
    (t0, groups0, busy0), (t1, groups1, busy1) = first, last
    dt = t1 - t0
    out = {g: (groups1[g] - groups0[g]) / dt for g in groups0}
    out["total"] = sum(out.values())
    out["machine"] = (busy1 - busy0) / dt
    return out


def _step_window(readings: list, *, what: str) -> dict:
    """Per step, what the replica's scheduler did between two ``(pid, StepStats)`` readings of the same process."""
    (pid0, first), (pid1, last) = readings
    if pid0 != pid1:  # Serve replaced the replica meanwhile: two processes' counters do not subtract
        raise RuntimeError(f"the replica was replaced during {what} (pid {pid0} -> {pid1}); its step figures would "
                           "mix two processes: run the benchmark again")
    return (last - first).per_step()


def _replica_step_stats(replica):
    """The replica's pid and its scheduler's :class:`~hotswap.scheduler.StepStats`."""
    from hotswap.scheduler import StepStats

    stats = replica.stats.remote().result()
    return stats["pid"], StepStats(**stats["step_stats"])


def _summary(window: list[Sample], seconds: float, *, stream: bool, tokens: _Tokens, max_tokens: int,
             extra: dict | None = None) -> dict:
    if stream:
        window = tokens.count(window, max_tokens)
    ok = [s for s in window if s.ok]
    n_tokens = sum(s.completion_tokens for s in ok)
    out = {**(extra or {}), **latency_summary(window), "tokens_per_s": n_tokens / seconds,
           "requests_per_s": len(ok) / seconds, "mean_completion_tokens": n_tokens / max(1, len(ok))}
    if stream:
        ttft = [(s.first_text - s.started) * 1e3 for s in ok if s.first_text is not None]
        out["first_text_p50_ms"] = percentile(ttft, 50)
        out["first_text_p99_ms"] = percentile(ttft, 99)
        # server-sent chunks per token: 1 means one event per token all the way from the scheduler to the client
        out["chunks_per_token"] = sum(s.chunks for s in ok) / n_tokens if n_tokens else None
    return out


def _start_app(settings_args: dict, name: str, base_url: str) -> tuple[str, str]:
    import httpx
    from ray import serve

    from deployments.app import make_app

    app = f"bench-serving-{name}"
    serve.run(make_app(settings_args, replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}),
              name=app, route_prefix=f"/{app}")
    url = f"{base_url}/{app}/v1/completions"
    wait_until(lambda: httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=60)
               .status_code == 200, timeout_s=300, what=f"{app} to answer")
    return app, url


def _stop_app(app: str) -> None:
    import ray
    from ray import serve

    from hotswap.controller import get_controller

    serve.delete(app)
    ray.kill(get_controller(app), no_restart=True)


def bench_service(settings_args: dict, *, base_url: str, name: str, concurrency: list[int], seconds: float,
                  max_tokens: int, streams: bool, mixed: dict | None) -> dict:
    from ray import serve

    app, url = _start_app(settings_args, name, base_url)
    replica = serve.get_deployment_handle("ModelReplica", app_name=app)  # the app's only replica
    meter = CpuMeter()  # the app's processes are up now
    tokens = _Tokens(url)

    def body(i: int, k: int) -> dict:
        return {"prompt": _prompt(i, k), "max_tokens": max_tokens, "temperature": 0}

    out: dict = {"service": {}}
    if streams:
        out["stream"] = {}
        for p in PROMPTS:
            tokens.learn(p, max_tokens)
    for c in concurrency:  # at each level, whole answers and then streams, back to back
        out["service"][f"c{c}"] = _level(url, clients=c, seconds=seconds, body=body, stream=False, tokens=tokens,
                                         max_tokens=max_tokens, what=name, replica=replica, meter=meter)
        if streams:
            out["stream"][f"c{c}"] = _level(url, clients=c, seconds=seconds, body=body, stream=True, tokens=tokens,
                                            max_tokens=max_tokens, what=name, replica=replica, meter=meter)
    if streams:  # the top level once more with clients that keep their connection (the others stop at [DONE], as
        top = max(concurrency)  # openai-python's sync client does, and so open a new one for every stream)
        out["stream_read_to_end"] = {f"c{top}": _level(
            url, clients=top, seconds=seconds, body=body, stream=True, tokens=tokens, max_tokens=max_tokens,
            what=name, read_to_end=True)}
    if mixed is not None:
        out["mixed"] = _mixed(url, tokens=tokens, seconds=seconds, **mixed)
    out["stream_text_mismatches"] = tokens.mismatches
    _stop_app(app)
    return out


def _mixed(url: str, *, tokens: _Tokens, seconds: float, short_tokens: int, short_clients: int, long_tokens: int,
           long_streams: int) -> dict:
    """Short requests alone, then the same under long streams."""
    # long streams from the prompts whose greedy answer runs longest (the tiny model stops at EOS on some)
    learned = sorted(PROMPTS, key=lambda p: -tokens.learn(p, long_tokens)[1])
    long_prompts = [p for p in learned if tokens.learn(p, long_tokens)[2] == "length"] or learned[:1]

    def short_body(i: int, k: int) -> dict:
        return {"prompt": _prompt(i, k), "max_tokens": short_tokens, "temperature": 0}

    def long_body(i: int, k: int) -> dict:
        return {"prompt": long_prompts[(i + k) % len(long_prompts)], "max_tokens": long_tokens, "temperature": 0}

    progress(f"mixed: {short_clients} clients of {short_tokens}-token requests alone for {seconds:.0f} s")
    window, t0, t1 = _window(url, clients=short_clients, body=short_body, seconds=seconds, warm=4)
    alone = _summary(window, t1 - t0, stream=False, tokens=tokens, max_tokens=short_tokens)

    progress(f"mixed: the same under {long_streams} streams of {long_tokens} tokens for {seconds:.0f} s")
    with ClosedLoop(url, clients=long_streams, body=long_body, stream=True) as streams:
        time.sleep(2.0)  # the streams are running (closed loop: each restarts as soon as it ends)
        window, t0, t1 = _window(url, clients=short_clients, body=short_body, seconds=seconds, warm=4)
    under = _summary(window, t1 - t0, stream=False, tokens=tokens, max_tokens=short_tokens)
    # the streams' own figures over the same window (streams that finished in it)
    long_window = _finished_in(streams.samples, t0, t1)
    long_summary = _summary(long_window, t1 - t0, stream=True, tokens=tokens, max_tokens=long_tokens)
    # a stream's tokens count at the end; those still running are not counted, so this is a lower bound
    return {"short_tokens": short_tokens, "short_clients": short_clients, "long_tokens": long_tokens,
            "long_streams": long_streams, "long_prompts": long_prompts,
            "long_mean_completion_tokens": statistics.fmean(tokens.learn(p, long_tokens)[1] for p in long_prompts),
            "short_alone": alone, "short_under_long": under, "long": long_summary}


# -- report --------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when b measured nothing (a very short run on a loaded machine)."""
    return a / b if a is not None and b else None


def _ratios(results: dict, concurrency: list[int], batch: int) -> tuple[dict, list[dict]]:
    top = max(concurrency)
    compiled = results["compiled"]
    # the engine's best round: the ratio is then the least favourable to the service (a shared machine's noise only
    # ever slows a round down)
    engine_full = compiled["engine"][f"batch_{batch}"]["max_tokens_per_s"]
    ratios: dict = {}
    targets = []

    def target(name: str, value: float | None, *, at_least: float | None = None, at_most: float | None = None):
        met = None if value is None else (value >= at_least if at_least is not None else value <= at_most)
        targets.append({"target": name, "value": value, "met": met})

    if "service" in compiled:  # not with --engine-only
        ratios[f"service_c{top}_over_engine_batch_{batch}"] = v = _ratio(
            compiled["service"][f"c{top}"]["tokens_per_s"], engine_full)
        target(f"service tokens/s at {top} clients >= 0.6 x the in-process engine (batch {batch}, its best round)",
               v, at_least=0.6)
    if "stream" in compiled:
        ratios[f"stream_c{top}_over_service_c{top}"] = v = _ratio(compiled["stream"][f"c{top}"]["tokens_per_s"],
                                                                compiled["service"][f"c{top}"]["tokens_per_s"])
        target(f"{top} streaming clients >= 0.9 x the tokens/s of {top} non-streaming clients", v, at_least=0.9)
    if "stream_read_to_end" in compiled:  # not a target: what clients that keep their connection get
        ratios[f"stream_read_to_end_c{top}_over_service_c{top}"] = _ratio(
            compiled["stream_read_to_end"][f"c{top}"]["tokens_per_s"], compiled["service"][f"c{top}"]["tokens_per_s"])
    if "mixed" in compiled:
        m = compiled["mixed"]
        ratios["short_p50_under_long_over_alone"] = v = _ratio(m["short_under_long"]["p50_ms"],
                                                               m["short_alone"]["p50_ms"])
        target(f"p50 of {m['short_tokens']}-token requests under {m['long_streams']} streams of "
               f"{m['long_tokens']} tokens <= 2 x alone", v, at_most=2.0)
    if "compiled_1slot" in results:
        one = results["compiled_1slot"]["engine"]
        for key in (f"batch_{b}" for b in sorted({1, batch})):
            ratios[f"engine_{key}_1slot_over_2slots"] = _ratio(one[key]["tokens_per_s"],
                                                                compiled["engine"][key]["tokens_per_s"])
    if "eager" in results:
        eager = results["eager"]
        ratios["compiled_over_eager"] = {
            **{f"service c{c}": _ratio(compiled["service"][f"c{c}"]["tokens_per_s"],
                                       eager["service"][f"c{c}"]["tokens_per_s"])
               for c in concurrency if f"c{c}" in eager.get("service", {}) and "service" in compiled},
            **{f"engine {k.replace('_', ' ')}": _ratio(compiled["engine"][k]["tokens_per_s"],
                                                        eager["engine"][k]["tokens_per_s"])
               for k in compiled["engine"] if k.startswith("batch_")},
        }
    return ratios, targets


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _print_steps(compiled: dict, *, batch: int) -> None:
    """Where the scheduler thread's time went per step: the in-process engine's rounds at ``batch`` in flight
    against the replica's at each service level (compiled, 2 slots)."""
    lines = [(f"engine {batch} in flight, round {k + 1}", r.get("step") or {})
             for k, r in enumerate(compiled.get("engine", {}).get(f"batch_{batch}", {}).get("rounds", ()))]
    for kind in ("service", "stream"):
        for row in compiled.get(kind, {}).values():
            lines.append((f"service {'stream' if row['stream'] else 'whole'} {row['concurrency']} clients",
                          row.get("step") or {}))
    if not any(step for _, step in lines):
        return

    def cell(value, width: int, digits: int = 2) -> str:
        return f"{'-' if value is None else format(value, f'.{digits}f'):>{width}}"

    print("\nthe scheduler thread, per step: ms of the window (loop) = its CPU + waiting for a core (runq) + blocked "
          "(GIL, locks, no work);\nof which in steps (wall, CPU) and in the forward (wall, CPU); rows, tokens and "
          "queued requests per step")
    print(f"  {'where':34} {'steps':>6} {'prefill':>7} {'loop':>6} {'cpu':>6} {'runq':>6} {'blocked':>7} {'step':>6} "
          f"{'cpu':>6} {'fwd':>6} {'fwd cpu':>7} {'rows':>5} {'tokens':>6} {'queued':>6}")
    for label, step in lines:
        if step:
            print(f"  {label:34} {step['steps']:6d} {step['prefill_share']:7.2f} {cell(step.get('loop_ms'), 6)} "
                  f"{cell(step.get('thread_cpu_ms'), 6)} {cell(step.get('runqueue_ms'), 6)} "
                  f"{cell(step.get('blocked_ms'), 7)} {cell(step['step_ms'], 6)} {cell(step['step_cpu_ms'], 6)} "
                  f"{cell(step['forward_ms'], 6)} {cell(step['forward_cpu_ms'], 7)} {step['rows']:5.2f} "
                  f"{step['tokens']:6.2f} {step['queued']:6.2f}")


def _print_cores(compiled: dict) -> None:
    """The cores each group of processes used at each service level (compiled, 2 slots)."""
    rows = [(f"{'stream' if row['stream'] else 'whole'} {row['concurrency']} clients", row["cores"])
            for kind in ("service", "stream") for row in compiled.get(kind, {}).values() if row.get("cores")]
    if not rows:
        return
    shown = ("replicas", "ingress", "proxy", "haproxy", "load_and_benchmark")
    print(f"\ncores used in each level's window: this benchmark's processes by group, all of them, and the whole "
          f"machine ({os.cpu_count()} CPUs)")
    print(f"  {'where':20} " + " ".join(f"{g.removesuffix('_and_benchmark'):>8}" for g in shown)
          + f" {'other':>8} {'total':>8} {'machine':>8}")
    for label, cores in rows:
        other = cores["total"] - sum(cores.get(g, 0.0) for g in shown)
        print(f"  {label:20} " + " ".join(f"{cores.get(g, 0.0):8.2f}" for g in shown)
              + f" {other:8.2f} {cores['total']:8.2f} {cores['machine']:8.2f}")


def _print_table(payload: dict) -> None:
    results = payload["results"]
    print(f"\nengine in-process (scheduler, closed loop), max_tokens {payload['max_tokens']}, "
          f"{payload['engine_seconds']:.0f} s per level and round, {payload['engine_threads']} torch thread(s); "
          "median (best) of the rounds")
    print(f"  {'config':16} {'in flight':>9} {'tokens/s':>9} {'(best)':>8} {'ms/step':>8} {'tokens/step':>12}")
    for mode, label in (("compiled", "compiled 2 slots"), ("compiled_1slot", "compiled 1 slot"),
                        ("eager", "eager 2 slots")):
        if mode not in results:
            continue
        for key, row in results[mode]["engine"].items():
            if key.startswith("batch_"):
                per = row["tokens_per_step"]
                print(f"  {label:16} {row['rows_in_flight']:9d} {row['tokens_per_s']:9.1f} "
                      f"{row['max_tokens_per_s']:8.1f} {row['ms_per_step']:8.2f} "
                      f"{per if per is None else round(per, 2)!s:>12}")
    if "service" not in results["compiled"]:
        print("\nservice: not run (--engine-only)")
    else:
        print(f"\nservice: POST /v1/completions through Serve, 1 replica, max_batch_size {payload['max_batch_size']}, "
              f"max_tokens {payload['max_tokens']}, {payload['seconds']:.0f} s per level")
        print(f"  {'mode':9} {'kind':9} {'clients':>7} {'tokens/s':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'1st text p50':>12} {'failed':>7}")
    for mode in ("compiled", "eager"):
        if mode not in results:
            continue
        for kind in ("service", "stream", "stream_read_to_end"):
            for row in results[mode].get(kind, {}).values():
                label = "whole" if not row["stream"] else "stream" if not row.get("read_to_end") else "keep-conn"
                print(f"  {mode:9} {label:9} {row['concurrency']:7d} "
                      f"{row['tokens_per_s']:9.1f} {row['requests_per_s']:7.1f} {_ms(row['p50_ms']):>8} "
                      f"{_ms(row['p99_ms']):>8} {_ms(row.get('first_text_p50_ms')):>12} {row['failed']:7d}")
    _print_steps(results["compiled"], batch=payload["max_batch_size"])
    _print_cores(results["compiled"])
    m = results["compiled"].get("mixed")
    if m:
        print(f"\nmixed: {m['short_clients']} clients of {m['short_tokens']}-token requests, alone and under "
              f"{m['long_streams']} streams of {m['long_tokens']} tokens (mean {m['long_mean_completion_tokens']:.0f})")
        for key in ("short_alone", "short_under_long"):
            row = m[key]
            print(f"  {key:17} {row['requests']:6d} requests  p50 {_ms(row['p50_ms'])} ms  p99 {_ms(row['p99_ms'])} ms"
                  f"  failed {row['failed']}")
        row = m["long"]
        print(f"  {'long streams':17} {row['requests']:6d} finished  {row['tokens_per_s']:.1f} tokens/s (finished "
              f"ones)  first text p50 {_ms(row.get('first_text_p50_ms'))} ms  failed {row['failed']}")
    print("\nratios:")
    for key, value in payload["ratios"].items():
        if isinstance(value, dict):
            print(f"  {key}: " + ",  ".join(f"{k} {_x(v)}" for k, v in value.items()))
        else:
            print(f"  {key}: {_x(value)}")
    print("\ntargets:")
    for t in payload["targets"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {t['target']}: {_x(t['value'])} ({met})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the JSON result")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients (default 1 4 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per service level (default 10)")
    parser.add_argument("--engine-seconds", type=float, default=5.0,
                        help="measured seconds per in-process level and round (default 5)")
    parser.add_argument("--engine-rounds", type=int, default=2,
                        help="rounds of in-process measurements, the configurations taking turns (default 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per step, everywhere (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="the replicas' window (default 256)")
    parser.add_argument("--short-tokens", type=int, default=4, help="mixed: tokens of a short request (default 4)")
    parser.add_argument("--short-clients", type=int, default=2, help="mixed: clients of short requests (default 2)")
    parser.add_argument("--long-tokens", type=int, default=200, help="mixed: tokens of a long stream (default 200)")
    parser.add_argument("--long-streams", type=int, default=4, help="mixed: long streams at a time (default 4)")
    parser.add_argument("--stream-interval-ms", type=float, default=None,
                        help="the replicas' stream_interval_ms (default: the setting's default)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming levels and the mixed workload")
    parser.add_argument("--no-eager", action="store_true", help="skip compile: false (engine and service)")
    parser.add_argument("--no-1slot", action="store_true", help="skip the in-process engine with adapter_slots 1")
    parser.add_argument("--base-model", default="builtin:tiny-llama", help="a Hugging Face model folder or builtin:")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's)")
    parser.add_argument("--compile-mode", default=None, help="default, reduce-overhead (CUDA), ...")
    parser.add_argument("--initial-adapter", default="builtin:demo",
                        help="the adapter every configuration serves (default builtin:demo, for the built-in model)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="the engines' target_modules (default: the setting's default)")
    parser.add_argument("--max-rank", type=int, default=None, help="the engines' max_rank (default: the setting's)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="torch threads of the in-process engine (default: what the 1-CPU replica gets, "
                             "OMP_NUM_THREADS if set, else 1 by Ray's rule; on a 2-vCPU VM 2 threads ran the tiny "
                             "model 7.5x slower)")
    parser.add_argument("--engine-only", action="store_true",
                        help="the in-process engine only: no Ray, no service (e.g. on a GPU machine without Ray)")
    add_serve_env_argument(parser)
    args = parser.parse_args(argv)
    env = serve_env(parser, args)
    if args.engine_threads is None:
        args.engine_threads = _replica_threads(env)
    if min(args.concurrency) < 1 or args.seconds <= 0 or args.engine_seconds <= 0 or args.engine_rounds < 1:
        parser.error("--concurrency and --engine-rounds must be >= 1 and --seconds, --engine-seconds > 0")
    if not args.no_stream and args.long_streams + args.short_clients > args.max_batch_size:
        parser.error("--long-streams + --short-clients must fit in --max-batch-size (else the short requests "
                     "wait for a stream to end, which measures the queue, not the batching)")

    if args.engine_threads < 1:
        parser.error("--engine-threads must be at least 1")
    import torch

    torch.set_num_threads(args.engine_threads)  # the in-process engines only: the replicas are Ray's processes
    configs = [("compiled", True, 2)]
    if not args.no_1slot:
        configs.append(("compiled_1slot", True, 1))
    if not args.no_eager:
        configs.append(("eager", False, 2))
    results: dict = {}
    engines: dict[str, _InProcess] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        try:
            for mode, compiled, slots in configs:
                progress(f"{mode}: building the engine in-process ({slots} adapter slot{'s' if slots > 1 else ''})")
                engines[mode] = _InProcess(_settings_args(args, cache, compiled, adapter_slots=slots),
                                           max_tokens=args.max_tokens)
            # the configurations take turns, round after round, so that a slow spell of a shared machine does not
            # land on one of them only; the service's own configuration is measured once more after the service
            for i in range(args.engine_rounds):
                for mode, engine in engines.items():
                    progress(f"{mode}: engine in-process, round {i + 1} of {args.engine_rounds}")
                    engine.measure(args.engine_seconds)
            mixed = None if args.no_stream else {
                "short_tokens": args.short_tokens, "short_clients": args.short_clients,
                "long_tokens": args.long_tokens, "long_streams": args.long_streams}
            if not args.engine_only:
                with serve_cluster(cache, env=env) as base_url:
                    services = [("compiled", True)] + ([] if args.no_eager else [("eager", False)])
                    for mode, compiled in services:
                        progress(f"{mode}: starting the service")
                        results[mode] = bench_service(
                            _settings_args(args, cache, compiled), base_url=base_url, name=mode,
                            concurrency=args.concurrency, seconds=args.seconds, max_tokens=args.max_tokens,
                            streams=compiled and not args.no_stream, mixed=mixed if compiled else None)
                progress("compiled: engine in-process once more, after the service")
                engines["compiled"].measure(args.engine_seconds)
            for mode, engine in engines.items():
                results.setdefault(mode, {})["engine"] = engine.result()
        finally:
            for engine in engines.values():
                engine.close()
    ratios, targets = _ratios(results, args.concurrency, args.max_batch_size)
    payload = write_result("serving", args.json, argv, {
        "base_model": args.base_model, "device": args.device, "max_tokens": args.max_tokens, "seconds": args.seconds,
        "engine_seconds": args.engine_seconds, "engine_rounds": args.engine_rounds,
        "engine_threads": args.engine_threads, "serve_env": env,
        "max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len,
        "results": results, "ratios": ratios, "targets": targets})
    _print_table(payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
