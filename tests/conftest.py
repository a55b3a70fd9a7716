"""Test set-up: ZenML and MLflow state in a per-session temporary folder, offline, seeded.

The folder is removed when the session passes and kept (its path printed) when it fails; the work
folders of the artifacts built meanwhile (edgeopt.artifacts.new_workdir) go when the process exits.
``-m "not slow"`` is the inner loop: everything but the tests that run whole pipelines, start servers
or spawn interpreters.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="edgeopt-tests-"))
os.environ["ZENML_CONFIG_PATH"] = str(_STATE / "zenml")
os.environ["EDGEOPT_STATE_DIR"] = str(_STATE / "edgeopt")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_ENABLE_RICH_TRACEBACK"] = "false"
os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

from edgeopt.plan import parse_config  # noqa: E402
from tests._tiny import TINY  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(_STATE, ignore_errors=True)
    else:
        print(f"\nedgeopt test state kept for inspection: {_STATE}")


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
    from edgeopt.data.sources import load_dataset

    return load_dataset(tiny_config.data, seed=0)


@pytest.fixture(scope="session")
def teacher_ckpt(digits, tiny_config):
    from edgeopt.train.teacher import train_teacher

    return train_teacher(digits, tiny_config.teacher, seed=0)


@pytest.fixture(scope="session")
def student_ckpt(digits, teacher_ckpt, tiny_config):
    from edgeopt.train.fit import distill_student

    return distill_student(digits, teacher_ckpt, tiny_config.student, seed=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The team's servers (infra/team/): PostgreSQL, S3, `mlflow server`, a ZenML server; one set per
    test module that asks for them."""
    from infra.team.stack import TeamStack

    with TeamStack(tmp_path_factory.mktemp("team")) as team:
        yield team
