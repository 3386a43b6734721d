#!/usr/bin/env bash
# The GPU tier and the GPU benchmarks in one go, within a time budget: bash benchmarks/gpu.sh OUT_DIR [SECONDS]
#
# On a CUDA machine (bfloat16, compile_mode reduce-overhead, i.e. CUDA graphs), in order of importance:
#   1. tests/gpu                      -> OUT_DIR/gpu-tests.log, gpu-tests.xml
#   2. benchmarks.swap (tiny + 1.1B)  -> OUT_DIR/swap-gpu.json, swap-gpu.log
#   3. benchmarks.serving --engine-only on the 1.1B-shaped model -> OUT_DIR/serving-gpu.json, serving-gpu.log
# Each step gets what is left of SECONDS (default 540) and is stopped when that runs out, so the later ones
# may not run: the logs say which did. On an H200 (2026-12-04) the steps took about 90 s, 150 s (of which
# 110 s build and compile the 1.1B-shaped engine; --reload-reps 0 skips the recompiles, minutes each at that
# size) and, by estimate, 200 s (another 1.1B compile at batch 8). Models and adapters go to $HOTSWAP_GPU_CACHE (default
# /tmp/hotswap-gpu-cache), not OUT_DIR: the 1.1B-shaped model is 2.2 GB.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [SECONDS]}
budget=${2:-540}
cache=${HOTSWAP_GPU_CACHE:-/tmp/hotswap-gpu-cache}
mkdir -p "$out" "$cache"
export PYTHONUNBUFFERED=1
start=$(date +%s)
worst=0  # the exit status: the first step's that failed (124: stopped or skipped for the budget), else 0
left() { echo $(( budget - ($(date +%s) - start) )); }

step() {  # step NAME SECONDS_AT_MOST COMMAND...: runs COMMAND under what is left, at most SECONDS_AT_MOST
    local name=$1 most=$2; shift 2
    local t; t=$(left); (( t > most )) && t=$most
    if (( t < 20 )); then
        echo "== $name: skipped, $(left) s of the budget left" | tee -a "$out/steps.log"
        (( worst == 0 )) && worst=124
        return
    fi
    echo "== $name: up to $t s: $*" | tee -a "$out/steps.log"
    local s; s=$(date +%s)
    timeout -k 5 "$t" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    (( rc != 0 && worst == 0 )) && worst=$rc
    echo "== $name: exit $rc after $(( $(date +%s) - s )) s" | tee -a "$out/steps.log"
    tail -n 40 "$out/$name.log"
}

{
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    timeout 60 python -c "import sys, torch, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__,
        'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    nproc
} 2>&1 | tee "$out/env.log"

all=(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
step gpu-tests 140 python -m pytest tests/gpu -v -p no:cacheprovider --junitxml "$out/gpu-tests.xml"
step swap-gpu 200 python -m benchmarks.swap --json "$out/swap-gpu.json" --cache-dir "$cache" \
    --compile-mode reduce-overhead --reload-reps 0
step serving-gpu 300 python -m benchmarks.serving --engine-only --json "$out/serving-gpu.json" \
    --device cuda --compile-mode reduce-overhead --no-eager --no-1slot --engine-rounds 2 --engine-seconds 4 --max-tokens 64 \
    --base-model "$cache/models/tinyllama-1.1b-shape-v1-bf16" --initial-adapter "$cache/bench-store/tinyllama-1.1b-shape-0" \
    --target-modules "${all[@]}" --max-rank 64
echo "== done after $(( $(date +%s) - start )) s" | tee -a "$out/steps.log"
exit "$worst"
