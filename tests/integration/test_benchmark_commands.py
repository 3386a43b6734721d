"""The service benchmarks (rollout, serving, serve_floor) run from the install in a small configuration and write
the JSON they document. Each starts its own Ray and Serve in a subprocess, as from a fresh shell; figures are not
asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOTSWAP_CACHE_DIR": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)  # the benchmark starts its own Ray, as from a fresh shell
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900, env=env)


def test_rollout_benchmark_small_run_writes_its_json(tmp_path):
    out = tmp_path / "rollout.json"
    result = _run(["benchmarks.rollout", "--replicas", "1", "--rolls", "1", "--steady-s", "1", "--json", str(out)],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Serve redeploy" in result.stdout
    [row] = json.loads(out.read_text())["results"]
    assert row["replicas"] == 1
    assert row["hotswap_roll"]["time_to_new_version_s"]["n"] == 1
    assert row["serve_redeploy"]["time_to_new_version_s"] > 0
    for summary in (row["steady"], row["hotswap_roll"]["during_prepare"], row["hotswap_roll"]["during_swaps"]):
        assert {"requests", "failed", "p50_ms", "p99_ms"} <= set(summary)
    roll = row["hotswap_roll"]
    assert row["adapter_slots"] == 2
    [swap] = roll["swaps"]  # one replica, one roll: one swap, with the replica's own phase figures
    assert swap["roll"] == 1 and swap["this_roll"] and swap["drain_ms"] is not None and swap["copy_ms"] is not None
    assert roll["drain_ms_max"] == swap["drain_ms"] and "swaps_that_waited" in roll
    assert "p99_during_roll_over_steady" in row["ratios"]
    cpu = roll["cpu"]  # every group found among the benchmark's own processes, the controller's and replica's CPU read
    assert {"controller", "replicas", "ingress", "proxy", "s3_stand_in", "gcs", "load_and_benchmark"} <= set(cpu)
    assert cpu["controller"]["ms_per_roll"] > 0 and cpu["replicas"]["steady_cores"] > 0
    assert "control_plane_extra_ms_per_roll" in cpu


def test_serving_benchmark_small_run_writes_its_json(tmp_path):
    out = tmp_path / "serving.json"
    # one level and one engine round: the loops over levels and rounds are plain Python; every mode still runs
    result = _run(["benchmarks.serving", "--concurrency", "2", "--seconds", "2", "--engine-seconds", "1",
                   "--engine-rounds", "1",
                   "--max-batch-size", "4", "--long-streams", "2", "--short-clients", "1", "--long-tokens", "24",
                   "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout and "compiled_over_eager" in result.stdout
    payload = json.loads(out.read_text())
    results = payload["results"]
    for mode in ("compiled", "eager"):
        assert set(results[mode]["service"]) == {"c2"}
        assert results[mode]["service"]["c2"]["tokens_per_s"] > 0
        assert results[mode]["engine"]["batch_1"]["tokens_per_s"] > 0
        assert results[mode]["engine"]["batch_4"]["tokens_per_s"] > 0
    assert set(results["compiled"]["stream"]) == {"c2"}  # streaming clients, compiled only
    assert results["compiled"]["stream"]["c2"]["tokens_per_s"] > 0
    assert results["compiled"]["stream"]["c2"]["first_text_p50_ms"] > 0
    cores = results["compiled"]["service"]["c2"]["cores"]  # who used the cores in the level's window
    assert cores["replicas"] > 0 and cores["ingress"] > 0 and cores["load_and_benchmark"] > 0
    assert cores["total"] >= cores["replicas"] and cores["machine"] > 0
    assert "cores used in each level's window" in result.stdout
    assert results["compiled"]["stream"]["c2"]["read_to_end"] is False  # stops at [DONE] (openai-python's sync client)
    keep = results["compiled"]["stream_read_to_end"]["c2"]  # the top level again, clients that keep the connection
    assert keep["read_to_end"] is True and keep["tokens_per_s"] > 0 and keep["failed"] == 0
    mixed = results["compiled"]["mixed"]
    for key in ("short_alone", "short_under_long", "long"):
        assert mixed[key]["requests"] > 0 and mixed[key]["failed"] == 0
    assert results["compiled_1slot"]["engine"]["adapter_slots"] == 1
    assert results["compiled"]["engine"]["adapter_slots"] == 2
    assert results["eager"]["engine"]["compiled_graphs"] == 0  # eager really ran eagerly
    assert results["compiled"]["engine"]["compiled_graphs"] >= 2
    assert {"service_c2_over_engine_batch_4", "stream_c2_over_service_c2", "short_p50_under_long_over_alone",
            "engine_batch_4_1slot_over_2slots", "compiled_over_eager", "stream_read_to_end_c2_over_service_c2"
            } <= set(payload["ratios"])
    assert len(payload["targets"]) == 3


def test_serve_floor_benchmark_small_run_writes_its_json(tmp_path):
    out = tmp_path / "floor.json"
    result = _run(["benchmarks.serve_floor", "--clients", "2", "--seconds", "1", "--rounds", "1",
                   "--engine-seconds", "0.5", "--max-batch-size", "4", "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chain" in result.stdout and "service / engine" in result.stdout
    payload = json.loads(out.read_text())
    for name in ("direct", "chain", "hotswap"):
        (row,) = payload["rounds"][name]
        assert row["requests_per_s"] > 0 and row["failed"] == 0
    # the fixed answer has the tokens asked for; the service's are counted from its usage
    assert payload["rounds"]["direct"][0]["mean_completion_tokens"] == 16
    assert payload["engine"]["batch_4"]["tokens_per_s"] > 0 and payload["serve_env"] == {}
    assert {"service_over_engine", "chain_ceiling_over_engine", "direct_ceiling_over_engine"} <= set(payload["figures"])
