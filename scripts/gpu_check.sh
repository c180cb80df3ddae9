#!/usr/bin/env bash
# Everything this repo checks on a GPU machine, in one go (used through the device tool):
# GPU-marked tests, the MoE layer benchmark, and a short bf16 training run through the real CLI.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
echo "== GPU tests"; python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_models_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
echo "== MoE layer benchmark"; python3 benchmarks/moe_layer.py 2>&1 | tee "$out/moe_layer.txt"
echo "== MoE layer benchmark (torch.compile)"; python3 benchmarks/moe_layer.py --compile 2>&1 | tee "$out/moe_layer_compile.txt"
if [ -d data/digits ]; then
  echo "== trainer on CUDA (bf16)"
  python3 -c "from moedit.cli import main; import sys; sys.exit(main(sys.argv[1:]))" train configs/quickstart.yaml \
    train.run_dir=/tmp/gpu_run train.steps=200 train.device=cuda logging.tensorboard=false logging.log_every=50 \
    train.sample_every=0 2>&1 | tail -8 | tee "$out/train.txt"
fi
