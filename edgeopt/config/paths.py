"""Where relative config paths and edgeopt's local state live."""

from __future__ import annotations

import os
from pathlib import Path

# From a checkout, relative config paths and the local state live in the checkout; installed (site-packages),
# they live in the directory the command runs in (the user's project).
_SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
FROM_CHECKOUT = (_SOURCE_ROOT / "pyproject.toml").is_file()
PROJECT_ROOT = _SOURCE_ROOT if FROM_CHECKOUT else Path.cwd()


def resolve_path(p: Path) -> Path:
    """A path from the config: ``~`` is the user's home; relative paths are under the checkout (installed:
    the working directory)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def state_dir() -> Path:
    """Where edgeopt keeps its local state (MLflow store, decoded-image cache): ``EDGEOPT_STATE_DIR``,
    else ``.edgeopt`` inside the checkout, or in the working directory when installed (the tests point it
    at their own temporary folder)."""
    d = Path(os.environ.get("EDGEOPT_STATE_DIR") or PROJECT_ROOT / ".edgeopt")
    d.mkdir(parents=True, exist_ok=True)
    return d
