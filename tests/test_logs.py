"""Quiet by default: the ONNX exporter's optimizer passes, NNCF's log lines and Python warnings reach
the run's log file but not the console; verbose puts them back on the console. A real export, in a
fresh process with a console and a file handler on the root logger (as ZenML and the run log set them)."""

import subprocess
import sys

import pytest

from edgeopt.config import PROJECT_ROOT

SCRIPT = """
import logging, sys, warnings
from pathlib import Path

import torch

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
to_file = logging.FileHandler(sys.argv[1])
to_file.setFormatter(logging.Formatter("%(name)s: %(message)s"))
logging.getLogger().addHandler(to_file)
from edgeopt.logs import route_library_logs

route_library_logs(verbose=sys.argv[2] == "verbose")
from nncf.common.logging import nncf_logger  # imported after the set-up: NNCF adds its own console handler

from edgeopt.models.export import export_onnx

model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
export_onnx(model, [1, 8, 8], Path(sys.argv[1]).with_suffix(".onnx"))
nncf_logger.info("nncf: statistics collected")
warnings.warn("a library warning")
logging.getLogger("edgeopt.models.export").info("export: model written")
"""
pytestmark = pytest.mark.slow  # spawns interpreters that import torch and NNCF
CHATTER = ("onnxscript.optimizer", "onnx_ir.passes", "nncf: statistics collected", "a library warning")


def _run(tmp_path, mode: str):
    log = tmp_path / f"{mode}.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, log.read_text()


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_library_chatter_goes_to_the_log_file_and_to_the_console_only_when_verbose(tmp_path, mode):
    console, log_file = _run(tmp_path, mode)
    assert "export: model written" in console and "export: model written" in log_file
    assert all(c in log_file for c in CHATTER), log_file[-3000:]
    shown = [c for c in CHATTER if c in console]
    assert shown == ([] if mode == "quiet" else list(CHATTER)), console[-3000:]
