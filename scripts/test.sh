#!/usr/bin/env bash
# Set everything up (a .venv inside the checkout) and run the test suite on the real local stack.
# Extra arguments go to pytest, e.g. scripts/test.sh -k pareto
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ZENML_ANALYTICS_OPT_IN=false
exec .venv/bin/python -m pytest "$@"
