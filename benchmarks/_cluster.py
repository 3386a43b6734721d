"""What the benchmarks share: progress lines and the JSON writer; for the service benchmarks also a private
Ray + Serve on this machine, an S3 server on 127.0.0.1 and the machine description (the tests use
``free_port`` too)."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

PROMPTS = ("Hello", "The quick brown fox", "Once upon a time", "hotswap swaps adapters", "abc", "A B C D E F",
           "What is LoRA?", "x")


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A progress line on stderr, with the seconds since the benchmark started."""
    print(f"  .. [{time.monotonic() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), **gpu()}


def gpu() -> dict:
    """The GPU's name, when there is one (``{}`` without CUDA)."""
    import torch

    return {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # the thing polled is still starting
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def local_s3():
    """moto's S3 server on 127.0.0.1, in a process of its own; sets the standard AWS_* variables (for this process
    and Ray's workers). Its own process, not a thread here: the load clients' threads run in this process, and an S3
    server sharing their GIL would add its own work (serving the controller's downloads) to their latencies.

    It runs at the lowest CPU priority (nice 19): it stands in for S3, which is not on the serving machine, and
    Ray runs its workers (the whole service) at nice 15 (``RAY_worker_niceness``), so at this process's own
    nice 0 serving a download took the cores from every replica (a roll's p99 measured the S3 stand-in)."""
    import subprocess

    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        def listening() -> bool:
            if server.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"the S3 server (moto) exited with {server.returncode} before it listened:\n{tail}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        deadline = time.monotonic() + 60
        while not listening():
            if time.monotonic() > deadline:
                raise TimeoutError("the S3 server (moto) did not listen on 127.0.0.1 within 60 s")
            time.sleep(0.05)
        os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@contextmanager
def serve_cluster(cache: Path, *, num_cpus: int = 8, env: dict[str, str] | None = None):
    """Ray (``num_cpus`` logical CPUs, so replicas with fractional CPUs and a rolling redeploy fit) and Serve on a
    free loopback port; yields the HTTP base URL. Workers get :func:`worker_environment`; ``env`` (``--serve-env``)
    also goes into this process's environment before Ray starts, so that every Ray process has it."""
    import ray
    from ray import serve

    from deployments.app import SERVE_CONTROLLER_OPTIONS

    saved = {key: os.environ.get(key) for key in env or {}}
    try:
        os.environ.update(env or {})  # Ray's processes inherit it (this driver's own Ray constants are not re-read)
        worker_env = worker_environment(cache, env)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": worker_env},
                 logging_level=logging.WARNING,
                 log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options=SERVE_CONTROLLER_OPTIONS)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        for key, value in saved.items():  # what runs after the cluster (an in-process engine) runs without it
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def worker_environment(cache: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The runtime_env variables of a benchmark's Ray workers: the AWS_* ones, the cache, no tokenizer threads, and
    ``--serve-env``'s on top (a runtime_env variable overrides the inherited environment, so without them there the
    defaults here would silently win over what ``--serve-env`` gave)."""
    out = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    out.update(HOTSWAP_CACHE_DIR=str(cache), TOKENIZERS_PARALLELISM="false")
    out.update(env or {})
    return out


def add_serve_env_argument(parser) -> None:
    parser.add_argument("--serve-env", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="environment for the whole Ray cluster, set before it starts (e.g. "
                             "RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in place of Serve's Python HTTP proxy)")


def serve_env(parser, args) -> dict[str, str]:
    """``--serve-env`` as a dict (a malformed pair is a usage error)."""
    pairs = [item.partition("=") for item in args.serve_env]
    if any(not key or not sep or not value for key, sep, value in pairs):
        parser.error("--serve-env takes KEY=VALUE pairs with a value, e.g. RAY_SERVE_ENABLE_HA_PROXY=1")
    keys = [key for key, _, _ in pairs]
    if len(set(keys)) != len(keys):
        parser.error(f"--serve-env names {sorted({k for k in keys if keys.count(k) > 1})} more than once; give "
                     "each variable once")
    return {key: value for key, _, value in pairs}


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` whole or not at all (a benchmark rewrites its JSON as it goes; a kill mid-write must not
    truncate what an earlier write kept)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, target)


def write_result(benchmark: str, path: str, argv: list[str] | None, fields: dict, *,
                 machine_info: dict | None = None) -> dict:
    """Write a benchmark's JSON: its name, the command that reproduces it, the machine, then ``fields``."""
    payload = {"benchmark": benchmark,
               "command": " ".join([f"python -m benchmarks.{benchmark}", *(argv or sys.argv[1:])]),
               "machine": machine_info if machine_info is not None else machine(), **fields}
    write_json(path, payload)
    return payload


# -- CPU per process group ------------------------------------------------------------------------------------

CPU_GROUPS = (("controller", "HotswapController"), ("replicas", ":ModelReplica"), ("ingress", ":Ingress"),
               ("proxy", "ProxyActor"), ("serve_controller", "ServeController"), ("s3_stand_in", "moto.server"),
               ("gcs", "gcs_server"), ("raylet", "raylet"), ("dashboard_agent", "DashboardAgent"),
               ("haproxy", "haproxy"))


class CpuMeter:
    """CPU seconds (user + system) per group of this benchmark's own processes (its descendants: the Ray cluster it
    started, the S3 stand-in; not another cluster on the machine), and of this process (the load clients and the
    benchmark's own calls: ``load_and_benchmark``), read at window edges only. The processes are found once, when
    the replicas are up, so a reading is a few ``/proc`` reads; a process that exits keeps its last reading.
    Shared by ``benchmarks.rollout`` (what a roll costs) and ``benchmarks.serving`` (who uses the cores)."""

    def __init__(self) -> None:
        import psutil

        me = psutil.Process()
        self.procs: dict[str, list] = {"load_and_benchmark": [me]}
        for proc in me.children(recursive=True):
            try:
                line = " ".join(proc.cmdline())
            except psutil.Error:  # gone already
                continue
            group = next((g for g, needle in CPU_GROUPS if needle in line), "ray_other")
            self.procs.setdefault(group, []).append(proc)
        self._last: dict[int, float] = {}

    def read(self) -> dict[str, float]:
        out = {}
        for group, procs in self.procs.items():
            total = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    self._last[proc.pid] = t.user + t.system
                except Exception:  # noqa: BLE001 - exited: its last reading stands (deltas stay >= 0)
                    pass
                total += self._last.get(proc.pid, 0.0)
            out[group] = total
        return out
