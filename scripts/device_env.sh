# Sourced on the device machine (Python 3.12 + torch, no megatron-core): installs the wheels carried
# in .whl_mc (megatron-core 0.16.1 cp312, psutil, webdataset, braceexpand; fallback/ numpy and
# packaging where missing or old) into /tmp/site and exports PYTHONPATH. Returns 1 without wheels.
#   source scripts/device_env.sh
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
