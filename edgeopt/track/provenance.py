"""Who and what triggered a run: trigger kind, code commit, host; recorded with every promotion."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict

from edgeopt.config import PROJECT_ROOT


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> Dict[str, str]:
    """``EDGEOPT_TRIGGER`` (manual | schedule | ci; default: ci when CI is set, else manual)."""
    trigger = os.environ.get("EDGEOPT_TRIGGER") or ("ci" if os.environ.get("CI") else "manual")
    return {"trigger": trigger, "git_commit": git_commit(), "host": platform.node()}
