"""The service benchmarks (rollout, serving) run from the install in a small configuration and write the JSON
they document. Each starts its own Ray and Serve in a subprocess, as from a fresh shell; figures are not
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


def test_serving_benchmark_small_run_writes_its_json(tmp_path):
    out = tmp_path / "serving.json"
    result = _run(["benchmarks.serving", "--concurrency", "1", "2", "--seconds", "3", "--engine-reps", "2",
                   "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled / eager" in result.stdout
    payload = json.loads(out.read_text())
    for mode in ("compiled", "eager"):
        assert set(payload["results"][mode]["service"]) == {"c1", "c2"}
        assert payload["results"][mode]["service"]["c2"]["tokens_per_s"] > 0
        assert payload["results"][mode]["engine"]["batch_1"]["tokens_per_s"] > 0
    assert payload["results"]["eager"]["engine"]["compiled_graphs"] == 0  # eager really ran eagerly
    assert payload["results"]["compiled"]["engine"]["compiled_graphs"] >= 2
