#!/usr/bin/env bash
# Runs the whole test suite. First run: creates .venv and installs the pinned
# dependencies plus the test-only ones. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv test
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pytest -q tests "$@"
