#!/usr/bin/env bash
# The whole quickstart on a fresh machine: environment, built-in digits data, a tiny DiffMoE
# trained on the CPU, samples, routing statistics and TensorBoard logs. Extra arguments are
# config overrides, e.g. `scripts/quickstart.sh train.steps=200`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
moedit train configs/quickstart.yaml "$@"
