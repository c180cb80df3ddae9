#!/usr/bin/env bash
# The test suite, creating the environment first if needed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python -m pytest -q "$@"
