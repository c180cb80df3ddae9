#!/usr/bin/env bash
# One device call: the GPU tests of the code paths a change touched (time-limited, one process per
# file), then the `moedit train` throughput table (benchmarks/train.py via
# scripts/train_bench_device.sh's rows).
#   ROWS="..." TESTS="..." bash scripts/session_gpu_check.sh [OUT_DIR]     (carry .whl_mc)
# Optional, in this order after the tests: PROFILE="section.key=value ... | ..." runs
# benchmarks/profile_train.py once per '|'-separated list of overrides (wall vs GPU time per step,
# host syncs, top kernels);
# BASE_COMMIT=<commit> BASE_ROWS="..." times those rows with that commit's `moedit train` (a git
# worktree; before/after on one machine) after the rows of this checkout. TESTS=none: no tests.
# PLAN=a|b|c: what issues 23, 24, 26 and 27 still owe (benchmarks/RESULTS.md, "Owed"), three calls
# that fit 600 s each; the variables above, set explicitly, override a plan's.
#   a: the GPU tests of the graph, the compiled adaLN and the fused kernels, then the batch-32 rows:
#      local with the graph, REPA with the graph beside it (issue 26), then eager local and megatron
#      both ways (rows the time limit cuts are the last ones, so the least needed go last)
#   b: local eager at 32 and 128 beside a2bf29e's (issue 27 compares within one call), local with
#      the graph and megatron eager (the default) at 128, DiT-L/2 with the graph (the MoE overhead)
#   c: DiT-XL/2 at 256 and 128 (MFU at the largest batch that fits), REPA eager with pinned batches on
#      and off, compile, and the MoE layer alone
# Budget: a session has 1,800 s of device time and a machine goes back 30 s after a call, so each
# call usually pays a fresh start (2-3 min): a and b fit one session, c needs the next.
set -uo pipefail
case "${PLAN:-}" in
  a) : "${TESTS:=tests/test_models_gpu.py tests/test_train_gpu.py tests/test_models_fused.py}" "${TESTS_LIMIT:=220}"
     : "${ROWS:=DiffMoE-L-E8:32:local:train.cuda_graph=true DiffMoE-L-E8:32:local:train.repa.enabled=true:train.cuda_graph=true DiffMoE-L-E8:32:local DiffMoE-L-E8:32:megatron DiffMoE-L-E8:32:megatron:train.cuda_graph=true}"
     : "${STEPS:=30}" "${WARMUP:=10}" "${BENCH_LIMIT:=340}" ;;
  b) : "${TESTS:=none}"
     : "${ROWS:=DiffMoE-L-E8:32:local DiffMoE-L-E8:128:local DiffMoE-L-E8:128:local:train.cuda_graph=true DiffMoE-L-E8:128:megatron DiT-L/2:128:local:train.cuda_graph=true}"
     : "${BASE_COMMIT:=a2bf29e}" "${BASE_ROWS:=DiffMoE-L-E8:32:local DiffMoE-L-E8:128:local}"
     : "${STEPS:=30}" "${WARMUP:=10}" "${BENCH_LIMIT:=300}" "${BASE_LIMIT:=200}" ;;
  c) : "${TESTS:=none}"
     : "${ROWS:=DiT-XL/2:256:local:train.cuda_graph=true DiT-XL/2:128:local:train.cuda_graph=true DiffMoE-L-E8:32:local:train.repa.enabled=true DiffMoE-L-E8:32:local:train.repa.enabled=true:data.pin_memory=false DiffMoE-L-E8:32:local:train.compile=true}"
     : "${STEPS:=30}" "${WARMUP:=10}" "${BENCH_LIMIT:=420}" "${MOE_LAYER:=1}" ;;
  "") ;;
  *) echo "PLAN=${PLAN}: use a, b or c (or none)" >&2; exit 2 ;;
esac
out="${1:-${OUT:-/tmp/session_gpu_check}}"
mkdir -p "$out"
start=$(date +%s)
failures=0
source scripts/device_env.sh || exit 1
: > "$out/summary.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, megatron.core as mc; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', mc.__version__)"
  # the device's copy of .git may lag the working tree it was given: SOURCE_COMMIT names the caller's HEAD
  echo "commit ${SOURCE_COMMIT:-unknown (pass SOURCE_COMMIT=\$(git rev-parse --short HEAD))}; device's git: $(git log -1 --format=%h 2>/dev/null)"
} 2>&1 | tee "$out/env.txt"
tests=${TESTS:-"tests/test_train_gpu.py tests/test_models_gpu.py tests/test_models_fused.py tests/test_models_fused_router.py tests/test_models_fused_predictor.py"}
if [ "$tests" != none ]; then
  # One pytest process per file, sharing TESTS_LIMIT seconds: a device-side assert poisons the CUDA
  # context for the rest of its process (one such crash once failed every later test of the call).
  deadline=$(($(date +%s) + ${TESTS_LIMIT:-180}))
  for file in $tests; do
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 10 ]; then
      echo "gpu_tests_$(basename "$file" .py): not run (TESTS_LIMIT spent)" | tee -a "$out/summary.txt"
      failures=$((failures + 1))
      continue
    fi
    step "gpu_tests_$(basename "$file" .py)" "$left" python3 -m pytest -q -p no:cacheprovider -m gpu "$file"
  done
fi
if [ -n "${PROFILE:-}" ]; then  # runs separated by '|'
  IFS='|' read -r -a profiles <<< "$PROFILE"
  for i in "${!profiles[@]}"; do
    read -r -a profile_overrides <<< "${profiles[$i]}"
    step "profile_$i" "${PROFILE_LIMIT:-150}" python3 benchmarks/profile_train.py --warmup 5 --steps 5 --top 25 \
      --sync-check "${profile_overrides[@]}"
  done
fi
# issue 23 (megatron vs local at 32 and 128), 24 (targets; the whole-step CUDA graph; deferred checks off = the per-step-sync
# baseline), 25 (text model vs its class twin), 26 (REPA overhead at 32)
default_rows="DiffMoE-L-E8:32:local DiffMoE-L-E8:32:local:train.cuda_graph=true DiffMoE-L-E8:32:megatron"
default_rows+=" DiffMoE-L-E8:128:local DiffMoE-L-E8:128:local:train.cuda_graph=true DiffMoE-L-E8:128:megatron"
default_rows+=" DiT-L/2:128:local DiffMoE-L-E8:32:local:train.deferred_checks=false"
default_rows+=" DiffMoE-L-E8:32:local:train.repa.enabled=true DiffMoE-L-E16:32:local DiffMoE-L-E16-T:32:local"
read -r -a rows <<< "${ROWS:-$default_rows}"
step train_bench "${BENCH_LIMIT:-430}" python3 benchmarks/train.py --rows "${rows[@]}" --steps "${STEPS:-40}" \
  --warmup "${WARMUP:-20}" --log-every 10 --runs /tmp/train_bench_runs --json "$out/train.json"
if [ -n "${BASE_COMMIT:-}" ]; then
  git worktree add -f /tmp/moedit_base "$BASE_COMMIT" >/dev/null 2>&1 || git -c advice.detachedHead=false \
    clone -q --no-checkout . /tmp/moedit_base && git -C /tmp/moedit_base checkout -q "$BASE_COMMIT"
  read -r -a base_rows <<< "${BASE_ROWS:-DiffMoE-L-E8:32:local DiffMoE-L-E8:128:local}"
  step base_bench "${BASE_LIMIT:-300}" python3 benchmarks/train.py --repo /tmp/moedit_base --rows "${base_rows[@]}" \
    --steps "${STEPS:-40}" --warmup "${WARMUP:-20}" --log-every 10 --runs /tmp/train_bench_base --json "$out/base.json"
fi
if [ -n "${MOE_LAYER:-}" ]; then  # issue 24: the DiffMoE FFN alone against a dense FFN (E=16, graphed step)
  PYTHONPATH=$PWD step moe_layer "${MOE_LAYER_LIMIT:-120}" python3 benchmarks/moe_layer.py --iters 50 --kernel-time \
    --cuda-graph step --layer diffmoe --experts 16
fi
echo "total $(($(date +%s) - start)) s, $failures failed step(s)"
cat "$out/summary.txt"
