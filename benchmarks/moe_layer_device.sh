#!/bin/bash
# One device call: GPU tests of the MoE hot path, then the MoE-layer benchmark in every setting
# compared in benchmarks/RESULTS.md (plain PyTorch paths vs fused; eager vs CUDA graphs).
# Usage on the device machine: bash benchmarks/moe_layer_device.sh [bench]; logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
date -u; nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
B="python3 benchmarks/moe_layer.py --iters 50"
PLAIN="--combine index_add --bias-gelu baddbmm"
run() { echo "=== $*"; timeout 150 "$@" 2>&1 | tee -a "$OUT/bench.log" | grep -v "Warning\|warn\|run_backward"; }
if [ "$1" != "bench" ]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_models_fused.py tests/test_models_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -8
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_models_fused_router.py 2>&1 | tail -4
fi
run $B --kernel-time $PLAIN
run $B --kernel-time
run $B --cuda-graph step --kernel-time $PLAIN
run $B --cuda-graph step --kernel-time
run $B --cuda-graph step --kernel-time --layer diffmoe --unfused-router
run $B --cuda-graph layer
run python3 benchmarks/expert_gemm_variants.py
run python3 benchmarks/topk_variants.py
run $B --layer diffmoe --experts 16 --profile --iters 5 > "$OUT/profile_e16.txt"
tail -3 "$OUT/profile_e16.txt"
date -u
