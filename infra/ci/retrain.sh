#!/usr/bin/env bash
# CI retraining, and the same locally: set up .venv, run the pipeline through the quality gate and
# leave the selection report in reports/ (selection.md, pareto.png).
#   bash infra/ci/retrain.sh                              # configs/default.yaml
#   bash infra/ci/retrain.sh -c configs/imagefolder.yaml  # extra arguments go to `run.py run`
# Exit status: 0 a variant met the target's constraints (promoted, or the champion kept because it
# is still better); 3 none did (the quality gate); 1 the run failed; 2 a bad config.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
export EDGEOPT_TRIGGER=${EDGEOPT_TRIGGER:-ci}
exec .venv/bin/python run.py run -c configs/default.yaml --require-promotion --report-dir reports "$@"
