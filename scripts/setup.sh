#!/usr/bin/env bash
# Creates .venv inside the checkout and installs edgeopt with everything it needs (the [dev] test
# tools, the [kubeflow] compiler that tests/test_kubeflow_compile.py uses, the [team] services of
# infra/team/ that tests/test_team_stack.py starts and the [edge] ExecuTorch exporter and runtime, in one
# resolve), then .venv/litert, the LiteRT converter's own environment (see below).
# pyproject.toml holds ranges (what edgeopt works with, for a team's own project); constraints.txt the
# exact versions tested here. Idempotent: re-running with both unchanged does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=dev,kubeflow,team,edge
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgeopt-installed
want=$( (cat pyproject.toml constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "edgeopt: installing dependencies into .venv (first time: ~3-4 minutes, ~7.3 GB)" >&2
  # (this machine's pip config names local wheel folders that may be absent: drop those warnings)
  .venv/bin/python -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
  # (quiet unless it fails: importing executorch logs torch's start-up lines)
  out=$(.venv/bin/python -c "import edgeopt, zenml, mlflow, optuna, torch, torchvision, onnxruntime, openvino, nncf, torch_pruning, kfp, selenium, executorch.runtime, ai_edge_litert.interpreter" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# The LiteRT converter (litert-torch, with ai-edge-quantizer) cannot share .venv: its xdsl pins
# typing-extensions<4.13, edgeopt's pydantic needs 4.14.1 or later. It gets .venv/litert, which holds only
# what differs (constraints-litert.txt: ~0.9 GB, 1-2.5 minutes) and reuses .venv's torch, numpy and ai-edge-litert
# through a .pth file placed after its own site-packages: one torch on both sides of torch.export.save/load,
# no second 5.5 GB torch. edgeopt.formats.tflite runs it as a subprocess (EDGEOPT_LITERT_PYTHON overrides).
LITERT=.venv/litert
lstamp=$LITERT/.edgeopt-installed
lwant=$( (cat constraints-litert.txt; cat "$stamp") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$lstamp" 2>/dev/null)" != "$lwant" ]; then
  echo "edgeopt: installing the LiteRT converter into $LITERT (first time: ~1-2.5 minutes, ~0.9 GB)" >&2
  [ -x "$LITERT/bin/python" ] || "$PY" -m venv "$LITERT"
  own=$("$LITERT/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$LITERT/bin/python" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$main" "$own" \
    > "$own/zz-edgeopt-main.pth"  # a relative path: .pth lines are read from the site folder
  "$LITERT/bin/python" -m pip install --quiet -c constraints-litert.txt litert-torch==0.10.0 2> >(grep -v -e "is ignored: it is neither" -e "dependency resolver does not currently take" -e "requires typing.extensions" -e "which is incompatible" >&2)
  out=$("$LITERT/bin/python" -I -c "import litert_torch, ai_edge_quantizer, torch" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$lwant" > "$lstamp"
fi
