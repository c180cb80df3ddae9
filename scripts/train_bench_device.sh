#!/usr/bin/env bash
# `moedit train` throughput on one GPU (benchmarks/train.py, the trainer's own metrics.jsonl), in one
# device call: DiffMoE-L-E8 at global batch 32 and 128 on the local and megatron engines, and DiT-L/2
# at 128 for the MoE overhead. Carry .whl_mc (megatron-core and friends, scripts/device_env.sh).
#   bash scripts/train_bench_device.sh [OUT_DIR] [ROW ...]
set -uo pipefail
out="${1:-${OUT:-/tmp/train_bench}}"
shift || true
mkdir -p "$out"
start=$(date +%s)
source scripts/device_env.sh || exit 1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, megatron.core as mc; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| megatron-core', mc.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} 2>&1 | tee "$out/env.txt"
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(DiffMoE-L-E8:32:local DiffMoE-L-E8:32:megatron DiffMoE-L-E8:128:local
                               DiffMoE-L-E8:128:megatron DiT-L/2:128:local)
python3 benchmarks/train.py --rows "${rows[@]}" --steps "${STEPS:-60}" --warmup "${WARMUP:-20}" \
  --runs /tmp/train_bench_runs --json "$out/train.json" 2>&1 | tee "$out/train.txt"
echo "total $(($(date +%s) - start)) s"
