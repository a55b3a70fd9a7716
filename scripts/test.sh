#!/usr/bin/env bash
# Set everything up (a .venv inside the checkout) and run the test suite on the real local stack.
# Extra arguments go to pytest, e.g. scripts/test.sh -k pareto
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_mlflow_ui.py drives Debian's chromium through chromedriver: install both from apt when
# missing (once; a browser is never downloaded any other way). A failed install stops here.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "edgeopt: installing chromium and chromium-driver (apt) for the MLflow UI test" >&2
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
# tests/test_team_stack.py and test_zenml_dashboard.py start infra/team/: PostgreSQL from Debian (the
# ZenML server, S3 clients and moto's S3 server come with the `team` extra, installed by setup.sh)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
export ZENML_ANALYTICS_OPT_IN=false
# lint (with import sorting) and types first: a few seconds, and they name the line
.venv/bin/ruff check edgeopt edgeopt_zenml run.py tests bench infra examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
