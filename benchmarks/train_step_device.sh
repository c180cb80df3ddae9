#!/usr/bin/env bash
# One device call on one GPU: the 1-GPU parity check of the Megatron DiT (bf16 / fp32 / autocast,
# scripts/megatron_gpu_parity.py), then benchmarks/train_step.py for the issue-6 models once per
# variant (A/B of the fast paths), the first variant with a kernel profile. Outputs in OUT_DIR.
#   bash benchmarks/train_step_device.sh [OUT_DIR]        (carry .whl_mc; default OUT_DIR: $OUT)
# VARIANTS: ';'-separated extra arguments, one benchmark run each (default: everything on; Megatron's
# foreach grad-norm kernels off; the local linear and the local MoE path off).
# MODELS, STEPS, REPEAT: passed on. PARITY=0 skips the parity check.
set -uo pipefail
out="${1:-${OUT:-/tmp/train_step_device}}"
mkdir -p "$out"
source scripts/device_env.sh || exit 1
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log -1 --format='commit %h %s' 2>/dev/null; } \
  | tee "$out/env.txt"
status=0
if [ "${PARITY:-1}" = 1 ]; then
  timeout 120 torchrun --standalone --nproc_per_node 1 scripts/megatron_gpu_parity.py --layouts one \
    --json "$out/parity_one.json" 2>&1 | tail -25 | tee "$out/parity_one.txt" || status=1
fi
IFS=';' read -r -a variants <<< "${VARIANTS:- ;--ablate foreach;--ablate local-linear local-moe}"
i=0
for variant in "${variants[@]}"; do
  profile=(); [ "$i" = 0 ] && [ "${PROFILE:-1}" = 1 ] && profile=(--profile)
  # shellcheck disable=SC2086  # a variant is a list of arguments
  timeout 300 python3 benchmarks/train_step.py --models ${MODELS:-DiT-XL/2 DiT-L/2 DiffMoE-L-E8} $variant \
    --steps "${STEPS:-8}" --repeat "${REPEAT:-3}" --warmup 4 ${profile[@]+"${profile[@]}"} \
    --json "$out/train_step_$i.json" 2>&1 | grep -v -i "warn\|Unknown MLP type" | tee "$out/train_step_$i.txt" || status=1
  i=$((i + 1))
done
exit $status
