#!/usr/bin/env bash
# Issue 12 in one device call on a 4- or 8-GPU machine (carry .whl_mc):
#   (a) parity of `moedit train` on the megatron engine with the local engine (bf16, fp32; DiffMoE-L-E16
#       widths at depth 4 and tiny-tc; every logged loss, loss/<term> and grad_norm of 5 steps):
#       TP2xEP2, PP2xEP2, TP2xPP2 on 4 GPUs, TP2xPP2xEP2 on 8 (scripts/megatron_gpu_parity.py, which
#       launches torchrun itself);
#   (b) 200 steps of DiffMoE-L-E16 on synthetic 4x32x32 latents through `moedit train`
#       (configs/megatron_diffmoe_l_e16_3d.yaml: TP=2 x EP=2 on 4 GPUs, + PP=2 on 8), checkpoint at 200;
#   (c) that checkpoint resharded to 2 GPUs (EP=2) and resumed to step 220;
#   (d) scripts/megatron_train_check.py on the run (loss falls, thresholds equal, canonical files),
#       and the logged images/s per GPU and MFU of (b) (metrics.jsonl: MFU per GPU of the whole world).
#   bash scripts/megatron_3d_check.sh [OUT_DIR]      (default $OUT; OPTIMIZER=distributed for Megatron's)
#   PHASE=parity (a only) or PHASE=train (b-d only) splits it into two calls under 10 minutes each;
#   LAYOUTS="tp2-ep2" runs the parity of those layouts only.
# Each step has a time limit; outputs are tee'd into OUT_DIR and exit codes collected in summary.txt.
set -uo pipefail
out="${1:-${OUT:-/tmp/megatron_3d_check}}"
mkdir -p "$out"
start=$(date +%s)
source scripts/device_env.sh || exit 1
gpus=$(nvidia-smi --list-gpus | wc -l)
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "GPUs: $gpus"; } | tee "$out/env.txt"
if [ "$gpus" -lt 4 ]; then
  echo "needs 4 or 8 GPUs; this machine has $gpus" | tee "$out/summary.txt"
  exit 1
fi
: > "$out/summary.txt"
failures=0

world=4 layouts="tp2-ep2 pp2-ep2 tp2-pp2" extra=()
if [ "$gpus" -ge 8 ]; then
  world=8 layouts="tp2-pp2-ep2" extra=(parallel.pipeline=2 parallel.num_microbatches=4)
fi
phase="${PHASE:-all}" layouts="${LAYOUTS:-$layouts}"
# (a) parity, one invocation per layout
[ "$phase" = train ] && layouts=""
for layout in $layouts; do
  step "parity_$layout" 300 python3 scripts/megatron_gpu_parity.py \
    --layouts "$layout" --flavors DiffMoE-L-E16 tiny-tc --dtypes bf16 fp32 --json "$out/parity_$layout.json"
done
# (b)-(d) training, resharding, checks
if [ "$phase" = parity ]; then
  echo "== done in $(($(date +%s) - start)) s; $failures step(s) failed" | tee -a "$out/summary.txt"
  [ "$failures" -eq 0 ]; exit
fi
data=/tmp/synthetic-4x32x32 run=/tmp/megatron_3d_run
step prepare 120 python3 -m moedit.cli prepare --source synthetic --latent-shape 4,32,32 --num-samples 16384 \
  --output "$data" --no-progress
cfg=configs/megatron_diffmoe_l_e16_3d.yaml
common=(train.run_dir=$run data.path=$data logging.progress=lines parallel.megatron_optimizer="${OPTIMIZER:-auto}" checkpoint.every=200)
step train_3d 300 torchrun --standalone --nproc_per_node "$world" -m moedit.cli train $cfg "${common[@]}" \
  "${extra[@]}" train.steps=200
cp "$run/metrics.jsonl" "$out/metrics_3d.jsonl" 2>/dev/null
# the 2-GPU launch writes a 2 B-parameter checkpoint at its last step: ~100 s of the limit on 4 x H200
step train_2gpu 300 torchrun --standalone --nproc_per_node 2 -m moedit.cli train $cfg "${common[@]}" \
  parallel.tensor=1 parallel.sequence_parallel=false parallel.pipeline=1 train.steps=220 logging.log_every=5
cp "$run/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null
step train_check 60 python3 scripts/megatron_train_check.py $run --steps 220
step throughput 10 python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("step", 0) <= 200 and "images_per_s" in r]
tail = rows[len(rows) // 2:] or rows  # after warm-up
ips = sum(r["images_per_s"] for r in tail) / len(tail)
mfu = [r["mfu"] for r in tail if "mfu" in r]
print(f"3-D run, steps {tail[0]['step']}..{tail[-1]['step']}: {ips:.1f} images/s in all"
      + (f", MFU per GPU {100 * sum(mfu) / len(mfu):.1f}%" if mfu else ""))
PY
echo "== done in $(($(date +%s) - start)) s; $failures step(s) failed" | tee -a "$out/summary.txt"
[ "$failures" -eq 0 ]
