"""Keep ZenML's and MLflow's state inside the checkout, offline; call before importing zenml."""

from __future__ import annotations

import os

from edgeopt.config import state_dir


def configure_local_state() -> None:
    """Defaults only: anything the user already set (another ZenML config, a server) wins."""
    os.environ.setdefault("ZENML_CONFIG_PATH", str(state_dir() / "zenml"))
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
