#!/usr/bin/env bash
# Set everything up (a .venv inside the checkout) and run the main job on the embedded default:
# scikit-learn's digits, ZenML's local stack, MLflow in .edgeopt/mlflow.db, deploy/ as the deploy folder.
# Extra arguments go to `run.py run`, e.g. scripts/run.sh -c configs/imagefolder.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python run.py run "$@"
