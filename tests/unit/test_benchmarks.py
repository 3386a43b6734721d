"""The benchmark commands run from the install and write the JSON they document (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_swap_benchmark_quick_writes_its_json(tmp_path):
    out = tmp_path / "swap.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.swap", "--quick", "--reps", "20", "--json", str(out),
                             "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine_swap_ms" in result.stdout  # the table is printed
    payload = json.loads(out.read_text())
    [tiny] = payload["results"]
    for key in ("model", "adapter_bytes", "copy_bytes", "adapter_slots", "device", "dtype", "memcpy_ms",
                "engine_swap_ms", "engine_copy_ms", "engine_revert_ms", "peft_from_state_dict_ms",
                "peft_hotswap_adapter_ms", "memcpy_same_pair_ms",
                "reload_recompile_ms", "ratios"):
        assert key in tiny
    assert tiny["engine_swap_ms"]["n"] >= 20 and tiny["engine_copy_ms"]["n"] == tiny["engine_swap_ms"]["n"]
    assert tiny["peft_from_state_dict_ms"]["n"] >= 20 and tiny["peft_hotswap_adapter_ms"]["n"] >= 20
    assert tiny["copy_bytes"] >= tiny["adapter_bytes"] > 0  # the packed slot prefix holds the adapter
    # every timed swap loaded a version its slot did not hold: a real copy, never the no-copy flip of a revert
    assert tiny["engine_copy_ms"]["median"] > 0 and tiny["engine_revert_ms"]["n"] >= 20
    assert tiny["engine_recompiles"] == 0
    assert tiny["reload_recompiles"] >= 1  # the naive path does recompile (the control of the line above)



def test_swap_layout_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "layout.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.swap_layout", "--reps", "3", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    for key in ("flat_copy_ms", "lora_A_rows_ms", "lora_B_strided_cols_ms", "rank_major_copy_ms", "layout_over_flat",
                "rank_major_over_flat"):
        assert payload[key] > 0
    assert payload["destinations"] == 308 and payload["slot_buffer_shape"] == [64, 788480]


def test_streaming_load_clients_reuse_their_connection_only_when_they_read_to_the_end():
    """A client that stops at ``data: [DONE]`` (as openai-python's synchronous client does) leaves the chunked
    body's end unread, so httpx closes the connection: every stream opens a new one. The benchmarks' streaming
    clients do the same unless told to read to the end, as whole-answer clients do. A real uvicorn server on
    loopback counts the connections."""
    import socket
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from benchmarks.load import ClosedLoop

    peers: set[int] = set()

    async def completions(request):
        peers.add(request.scope["client"][1])  # the client's port: one per connection

        async def sse():
            yield 'data: {"choices": [{"text": "a"}]}\n\n'
            yield 'data: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'
        return StreamingResponse(sse(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", completions, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        connections = {}
        for read_to_end in (True, False):
            peers.clear()
            load = ClosedLoop(f"http://127.0.0.1:{port}/", clients=1, body=lambda i, k: {"prompt": "p"},
                              stream=True, max_requests=6, read_to_end=read_to_end)
            with load:
                load.wait_for(6, timeout_s=30)
            assert [s.text for s in load.samples] == ["ab"] * 6 and all(s.ok and s.chunks == 2 for s in load.samples)
            connections[read_to_end] = len(peers)
        assert connections == {True: 1, False: 6}
    finally:
        server.should_exit = True
        thread.join(10)


def test_serving_benchmark_engine_only_measures_the_engine_without_ray(tmp_path):
    """``--engine-only`` (for a GPU machine without Ray): the in-process levels, no service, no service target."""
    out = tmp_path / "serving.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--engine-only", "--no-eager", "--no-1slot",
                             "--engine-seconds", "0.5", "--engine-rounds", "1", "--max-tokens", "4",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "service: not run (--engine-only)" in result.stdout
    payload = json.loads(out.read_text())
    compiled = payload["results"]["compiled"]
    assert set(compiled) == {"engine"}
    assert compiled["engine"]["batch_8"]["tokens_per_s"] > 0 and compiled["engine"]["batch_1"]["tokens_per_s"] > 0
    assert payload["targets"] == []
    step = compiled["engine"]["batch_8"]["rounds"][0]["step"]  # where the scheduler thread's time went, per step
    assert step["steps"] > 0 and 0 < step["forward_ms"] <= step["step_ms"] <= step["loop_ms"] * 1.01
    assert step["rows"] == 8.0 and step["failed_steps"] == 0
    assert "the scheduler thread, per step" in result.stdout


def test_the_engine_threads_default_follows_the_replicas_environment_serve_env_included(monkeypatch):
    """--serve-env OMP_NUM_THREADS=2 gives the replicas two threads (Ray keeps a value already set): the in-process
    engine it is compared with must get them too (an outside review: it kept 1)."""
    from benchmarks import serve_floor
    from benchmarks.serving import _replica_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _replica_threads() == 1 and _replica_threads({"OMP_NUM_THREADS": "2"}) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _replica_threads() == 3 and _replica_threads({"OMP_NUM_THREADS": "2"}) == 2
    with pytest.raises(SystemExit):  # a usage error before anything is built
        serve_floor.main(["--json", "/dev/null", "--max-tokens", "0"])


def test_serve_env_wins_over_the_benchmark_workers_defaults(monkeypatch, tmp_path):
    """A runtime_env variable overrides what a worker inherits: --serve-env's value for a key the benchmark's workers
    also set (the cache, tokenizer threads) must be the one they get (an outside review: the defaults won)."""
    from benchmarks._cluster import worker_environment

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    env = worker_environment(tmp_path, {"TOKENIZERS_PARALLELISM": "true", "RAY_SERVE_ENABLE_HA_PROXY": "1"})
    assert env["TOKENIZERS_PARALLELISM"] == "true" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["HOTSWAP_CACHE_DIR"] == str(tmp_path) and env["AWS_ACCESS_KEY_ID"] == "test"
    assert worker_environment(tmp_path)["TOKENIZERS_PARALLELISM"] == "false"


def test_a_step_window_across_a_replaced_replica_is_refused():
    """Two readings of the replica's step counters from two processes (Serve replaced it during a level) do not
    subtract: the benchmark says so instead of printing negative steps."""
    from benchmarks.serving import _step_window
    from hotswap.scheduler import StepStats

    first = StepStats(prefill_steps=5, decode_steps=10, tokens=100, rows=100, step_s=1.0, at_s=10.0)
    later = StepStats(prefill_steps=7, decode_steps=18, tokens=180, rows=180, step_s=2.0, at_s=11.0)
    assert _step_window([(1, first), (1, later)], what="a level")["steps"] == 10
    with pytest.raises(RuntimeError, match=r"replaced during a level \(pid 1 -> 2\)"):
        _step_window([(1, later), (2, first)], what="a level")


def test_the_cores_of_a_level_are_its_window_deltas_and_print_by_group(capsys):
    from benchmarks.serving import _cores, _print_cores

    first = (10.0, {"replicas": 5.0, "ingress": 1.0, "load_and_benchmark": 2.0, "gcs": 0.5}, 100.0)
    last = (12.0, {"replicas": 6.8, "ingress": 1.5, "load_and_benchmark": 2.2, "gcs": 0.6}, 103.2)
    cores = _cores(first, last)
    assert cores == pytest.approx({"replicas": 0.9, "ingress": 0.25, "load_and_benchmark": 0.1, "gcs": 0.05,
                                   "total": 1.3, "machine": 1.6})
    _print_cores({"service": {"c16": {"stream": False, "concurrency": 16, "cores": cores}}})
    line = next(x for x in capsys.readouterr().out.splitlines() if "whole 16 clients" in x)
    assert line.split()[3:] == ["0.90", "0.25", "0.00", "0.00", "0.10", "0.05", "1.30", "1.60"]

