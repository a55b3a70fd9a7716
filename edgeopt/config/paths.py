"""Where relative config paths and edgeopt's local state live.

A relative path in a config file is relative to the file's folder (as in docker-compose or a Makefile):
``root: imgs`` beside ``my.yaml`` is ``<folder of my.yaml>/imgs`` wherever the command runs. A config that
is not a file (a mapping built in Python, the pipeline's own parameters) resolves them under the
project root: the checkout, or the working directory when edgeopt is installed.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Optional

# From a checkout, relative config paths and the local state live in the checkout; installed (site-packages),
# they live in the directory the command runs in (the user's project).
_SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
FROM_CHECKOUT = (_SOURCE_ROOT / "pyproject.toml").is_file()
PROJECT_ROOT = _SOURCE_ROOT if FROM_CHECKOUT else Path.cwd()

# The folder of the config file being validated (set by the schema from pydantic's validation context,
# ``{"config_dir": ...}``), so that every validator that checks a path resolves it like the run will.
_CONFIG_DIR: ContextVar[Optional[Path]] = ContextVar("edgeopt_config_dir", default=None)


def resolve_path(p: Path) -> Path:
    """A path from the config: ``~`` is the user's home; a relative path is under the folder of the config
    file being validated, else under the project root (the checkout; installed: the working directory)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (_CONFIG_DIR.get() or PROJECT_ROOT) / p


@contextlib.contextmanager
def config_folder(folder: Optional[Path]) -> Iterator[None]:
    """Within this block, :func:`resolve_path` resolves relative paths under ``folder`` (None: no change)."""
    if folder is None:
        yield
        return
    token = _CONFIG_DIR.set(Path(folder))
    try:
        yield
    finally:
        _CONFIG_DIR.reset(token)


def anchored(p: Optional[Path], folder: Path) -> Optional[Path]:
    """A config path as the run reads it once the config file's folder is gone from the picture: a relative
    path joined to ``folder``, written relative to the project root where it lies under it (so a config in
    a checkout hands the same portable paths to a remote orchestrator as before), else absolute. ``~`` and
    absolute paths are kept as written."""
    if p is None or str(p).startswith("~") or Path(p).is_absolute():
        return p
    full = Path(os.path.normpath(Path(folder).absolute() / p))
    try:
        return full.relative_to(PROJECT_ROOT)
    except ValueError:
        return full


def state_dir() -> Path:
    """Where edgeopt keeps its local state (MLflow store, decoded-image cache): ``EDGEOPT_STATE_DIR``,
    else ``.edgeopt`` inside the checkout, or in the working directory when installed (the tests point it
    at their own temporary folder)."""
    d = Path(os.environ.get("EDGEOPT_STATE_DIR") or PROJECT_ROOT / ".edgeopt")
    d.mkdir(parents=True, exist_ok=True)
    return d
