"""Test set-up: ZenML and MLflow state in a per-session temporary folder, offline, seeded."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_STATE = Path(tempfile.mkdtemp(prefix="edgeopt-tests-"))
os.environ["ZENML_CONFIG_PATH"] = str(_STATE / "zenml")
os.environ["EDGEOPT_STATE_DIR"] = str(_STATE / "edgeopt")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_ENABLE_RICH_TRACEBACK"] = "false"
os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from edgeopt.config import parse_config  # noqa: E402

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"arch": "resnet_small", "width": 8, "epochs": 4, "lr": 0.05},
    "student": {"arch": "small_cnn", "width": 8, "epochs": 6, "lr": 0.05},
    "variants": {
        "bases": ["student"],
        "shrink": {"prune": {"amounts": [0.5], "finetune_epochs": 2, "lr": 0.02}},
        "quantization": ["fp32", "int8"],
        "formats": ["onnx", "openvino"],
        "runtimes": ["onnxruntime", "openvino"],
        "quant": {"calibration_samples": 64},
    },
    "target": {"warmup": 5, "iterations": 30, "constraints": {"max_accuracy_drop": 10.0, "max_size_mb": 1.0}},
    "registry": {"name": "tiny-model"},
    "tracking": {"experiment": "tiny"},
}


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def tiny_raw(state_dir) -> dict:
    return {
        **TINY,
        "tracking": {**TINY["tracking"], "uri": f"sqlite:///{state_dir / 'mlflow.db'}"},
        "deploy": {"root": str(state_dir / "deploy"), "keep": 2},
    }


@pytest.fixture(scope="session")
def tiny_config(tiny_raw):
    return parse_config(tiny_raw, "tiny")


@pytest.fixture(scope="session")
def digits(tiny_config):
    from edgeopt.data import load_dataset

    return load_dataset(tiny_config.data, seed=0)


@pytest.fixture(scope="session")
def teacher_ckpt(digits, tiny_config):
    from edgeopt.teacher import train_teacher

    return train_teacher(digits, tiny_config.teacher, seed=0)


@pytest.fixture(scope="session")
def student_ckpt(digits, teacher_ckpt, tiny_config):
    from edgeopt.training import distill_student

    return distill_student(digits, teacher_ckpt, tiny_config.student, seed=0)
