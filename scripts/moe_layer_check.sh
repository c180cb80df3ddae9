#!/usr/bin/env bash
# The MoE-layer work of issue 2 on one GPU, in one go (through the device tool, carrying .whl_mc):
# the Triton kernel tests, the gather-sum / predictor micro-benchmarks, the expert GEMMs (cuBLAS
# layouts; Triton with gathered rows), the layer table (CUDA graphs,
# GPU kernel time), DiffMoE with each fused piece switched off, what its capacity predictor costs
# (benchmarks/predictor_cost.py), a DiffMoE E=16 profile, and the
# whole-model train step (Megatron-Core, one GPU) of DiT-L/2 and DiffMoE-L.
# Usage: bash scripts/moe_layer_check.sh [OUT_DIR]    (PHASE=all, or some of tests,micro,gemm,table,variants,train_step,predictor,profile)
set -uo pipefail
out="${1:-${OUT:-/tmp/moe_layer_check}}"
mkdir -p "$out"
start=$(date +%s) failures=0
source scripts/device_env.sh || exit 1
phase="${PHASE:-all}"
want() { [ "$phase" = all ] || [[ " ${phase//,/ } " == *" $1 "* ]]; }  # PHASE: all, or a comma list
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
date -u | tee -a "$out/gpu.txt"
bench="python3 benchmarks/moe_layer.py --iters 50 --kernel-time --cuda-graph step"
if want tests; then
  step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_models_fused_predictor.py \
    tests/test_models_fused_router.py tests/test_models_fused.py tests/test_models_gpu.py
fi
want micro && step micro 200 python3 benchmarks/moe_kernels.py
if want gemm; then
  step gemm 200 python3 benchmarks/expert_gemm_variants.py
  step gather_gemm 200 python3 benchmarks/gather_gemm.py
fi
want table && step table 200 $bench
if want variants; then
  step no_predictor 100 $bench --layer diffmoe --unfused-predictor
  step no_router 100 $bench --layer diffmoe --unfused-router --unfused-predictor
fi
want train_step && step train_step 400 python3 benchmarks/train.py --rows DiT-L/2:128:local DiffMoE-L-E8:128:local \
  DiffMoE-L-E16:64:local --steps 60 --warmup 20
want predictor && step predictor 200 python3 benchmarks/predictor_cost.py
want profile && step profile 120 python3 benchmarks/moe_layer.py --layer diffmoe --experts 16 --profile --iters 5
echo "== done in $(($(date +%s) - start)) s, $failures failed step(s)"
cat "$out/summary.txt"
exit "$failures"
