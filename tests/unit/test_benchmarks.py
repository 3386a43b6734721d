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
