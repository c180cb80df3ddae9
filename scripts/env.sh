#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run again (it reinstalls only
# when pyproject.toml changed). MOEDIT_TORCH picks the torch requirement (default: the CPU
# build pinned below; on a GPU machine use e.g. MOEDIT_TORCH="torch" for your CUDA build).
# MOEDIT_EXTRAS adds optional groups of pyproject.toml, comma-separated, e.g. MOEDIT_EXTRAS=eval
# (pytorch-fid for `moedit evaluate`). The project and every extra install against a constraint
# that pins the torch (and triton) installed first, so no extra can replace them: `eval` gets the
# torchvision built for this torch (torch 2.13.0 -> torchvision 0.28.0), or pip stops with an error.
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
want="$( (cat "$root/pyproject.toml" "$root/scripts/env.sh"; echo "extras=${MOEDIT_EXTRAS:-}") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "moedit: installing dependencies into $venv (once)" >&2
  python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  python -m pip install -q "${MOEDIT_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # Triton: CUDA builds of torch bring their own; with the CPU build the tests run the Triton
  # kernels through Triton's interpreter (tests/conftest.py: rerun_in_triton_interpreter)
  if [ -z "${MOEDIT_TORCH:-}" ]; then
    python -m pip install -q "triton==3.9.0" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  pins="$venv/.moedit-pins.txt"  # torch and triton exactly as installed above
  python - > "$pins" <<'PY'
import importlib.metadata as md
for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
  extras="test${MOEDIT_EXTRAS:+,$MOEDIT_EXTRAS}"
  DS_BUILD_OPS=0 python -m pip install -q -c "$pins" -e "$root[$extras]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  if [ "$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)" != "$(sed -n 's/^torch==//p' "$pins")" ]; then
    echo "moedit: installing $extras changed torch (pinned: $(cat "$pins" | tr '\n' ' '))" >&2; exit 1
  fi
  # PyPI's torchvision is built for PyPI's (CUDA) torch: with a CPU build of torch its operators
  # do not load. Say which build to install instead (torch stays as it is either way).
  if [[ ",${MOEDIT_EXTRAS:-}," == *,eval,* ]] && ! python -c "import torchvision" >/dev/null 2>&1; then
    tv="$(python -c 'import importlib.metadata as m; print(m.version("torchvision"))')"
    variant="$(python -c 'import torch; v = torch.__version__; print(v.split("+")[1] if "+" in v else "")')"
    echo "moedit: torchvision $tv does not load with torch $(sed -n 's/^torch==//p' "$pins") (built for another" \
         "variant of torch); moedit evaluate --features inception needs the matching build${variant:+, e.g.}" \
         "${variant:+pip install --no-deps --force-reinstall torchvision==$tv --index-url https://download.pytorch.org/whl/$variant}" >&2
  fi
  python -c "import moedit, torch, webdataset" || { echo "moedit: installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
