#!/usr/bin/env bash
# Creates .venv inside the checkout and installs edgeopt with everything it needs (the [dev] test
# tools, the [kubeflow] compiler that tests/test_kubeflow_compile.py uses and the [team] services of
# infra/team/ that tests/test_team_stack.py starts, in one resolve).
# pyproject.toml holds ranges (what edgeopt works with, for a team's own project); constraints.txt the
# exact versions tested here. Idempotent: re-running with both unchanged does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=dev,kubeflow,team
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgeopt-installed
want=$( (cat pyproject.toml constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "edgeopt: installing dependencies into .venv (first time: ~3-4 minutes, ~6.6 GB)" >&2
  # (this machine's pip config names local wheel folders that may be absent: drop those warnings)
  .venv/bin/python -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -c "import edgeopt, zenml, mlflow, torch, torchvision, onnxruntime, openvino, nncf, torch_pruning, kfp, selenium"
  echo "$want" > "$stamp"
fi
