#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run again (it reinstalls only
# when pyproject.toml changed). MOEDIT_TORCH picks the torch requirement (default: the CPU
# build pinned below; on a GPU machine use e.g. MOEDIT_TORCH="torch" for your CUDA build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOEDIT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "moedit: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.moedit-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "moedit: installing dependencies into $venv (once)" >&2
  python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  python -m pip install -q "${MOEDIT_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # Triton: CUDA builds of torch bring their own; with the CPU build the tests run the Triton
  # kernels through Triton's interpreter (tests/conftest.py: rerun_in_triton_interpreter)
  if [ -z "${MOEDIT_TORCH:-}" ]; then
    python -m pip install -q "triton==3.9.0" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  DS_BUILD_OPS=0 python -m pip install -q -e "$root[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  python -c "import moedit, torch, webdataset" || { echo "moedit: installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
