# Sourced on the device machine (Python 3.12 + torch, no megatron-core): installs the wheels carried
# in .whl_mc (megatron-core 0.16.1 cp312, psutil, webdataset, braceexpand; fallback/ numpy and
# packaging where missing or old) into /tmp/site and exports PYTHONPATH. Returns 1 without wheels.
# Also defines `step` for scripts that run a list of checks.
#   source scripts/device_env.sh

# step NAME LIMIT_S COMMAND...: run with a time limit, tee into $out/NAME.txt, append the exit status
# to $out/summary.txt and count failures in $failures (the caller sets out, start and failures=0)
step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name ($(($(date +%s) - start)) s elapsed): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "== $name: timed out after $limit s" | tee -a "$out/$name.txt"
  echo "$name: exit $rc" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

if ! ls .whl_mc/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl_mc/: carry .whl_mc to this machine (megatron-core is not installed here)"
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl_mc/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD"
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import numpy" 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl_mc/fallback/numpy-*.whl
python3 -c "import packaging, sys; from packaging.version import Version; sys.exit(Version(packaging.__version__) < Version('24.2'))" 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl_mc/fallback/packaging-*.whl
