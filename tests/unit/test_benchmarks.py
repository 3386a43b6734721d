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
    for key in ("model", "adapter_bytes", "device", "dtype", "memcpy_ms", "engine_swap_ms",
                "peft_from_state_dict_ms", "peft_hotswap_adapter_ms", "reload_recompile_ms"):
        assert key in tiny
    assert tiny["engine_swap_ms"]["n"] >= 20
    assert tiny["engine_recompiles"] == 0
    assert tiny["reload_recompiles"] >= 1  # the naive path does recompile (the control of the line above)

