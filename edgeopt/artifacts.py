"""The project's artifact types: plain folders of files with a ``manifest.json``.

Nothing here is a pickle of a live object. Each artifact is a folder holding its files and a
manifest (kind, sha256 and size of every file, plus the recipe and lineage that produced it), so
it can be copied, hashed, verified and loaded by anyone with the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, List

import numpy as np

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_workdir(prefix: str) -> Path:
    """A fresh local folder for an artifact being built."""
    return Path(tempfile.mkdtemp(prefix=f"edgeopt-{prefix}-"))


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderArtifact:
    """A folder with a manifest. Subclasses name their ``KIND`` and add typed accessors."""

    KIND: ClassVar[str] = "artifact"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest: Dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("kind") != self.KIND:
            raise ValueError(f"{self.path}: manifest kind {self.manifest.get('kind')!r}, expected {self.KIND!r}")

    @classmethod
    def write(cls, path: Path, info: Dict[str, Any]) -> "FolderArtifact":
        """Finish a folder whose files are written: hash them into the manifest and open it."""
        path = Path(path)
        files = {
            p.relative_to(path).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = {"kind": cls.KIND, **info, "files": files}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
        return cls(path)

    def verify(self) -> None:
        """Raise if a file is missing or its bytes differ from the manifest."""
        for name, meta in self.manifest["files"].items():
            p = self.path / name
            if not p.is_file():
                raise ValueError(f"{self.path}: file {name} listed in the manifest is missing")
            if sha256_file(p) != meta["sha256"]:
                raise ValueError(f"{self.path}: file {name} does not match its sha256 in the manifest")

    @property
    def content_hash(self) -> str:
        """A hash of the folder's content, stable across copies (used as ZenML's cache key)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def size_bytes(self) -> int:
        return sum(meta["bytes"] for meta in self.manifest["files"].values())

    def copy_to(self, dest: Path) -> "FolderArtifact":
        shutil.copytree(self.path, dest, dirs_exist_ok=True)
        return type(self)(dest)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path})"


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class Dataset(FolderArtifact):
    """Train/val/test arrays: ``x_<split>.npy`` (N, C, H, W float32, normalized), ``y_<split>.npy``."""

    KIND = "dataset"

    def split(self, name: str):
        return np.load(self.path / f"x_{name}.npy"), np.load(self.path / f"y_{name}.npy")

    @property
    def classes(self) -> List[str]:
        return self.manifest["classes"]

    @property
    def input_shape(self) -> List[int]:
        return self.manifest["input_shape"]

    @property
    def data_hash(self) -> str:
        return self.manifest["data_hash"]


class Checkpoint(FolderArtifact):
    """A torch model as ``weights.pt`` (a state dict, loaded with weights_only=True) + its architecture."""

    KIND = "checkpoint"

    @property
    def role(self) -> str:
        return self.manifest["role"]


class ModelArtifact(FolderArtifact):
    """An exported model for one runtime: ``model.onnx`` or ``model.xml``+``model.bin``.

    A variant that failed to build is still a ModelArtifact, with ``status: failed`` and the reason,
    so that one bad variant is recorded and skipped instead of sinking the run.
    """

    KIND = "model"

    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def failed(self) -> bool:
        return self.manifest.get("status") == "failed"

    @property
    def model_file(self) -> Path:
        return self.path / ("model.onnx" if self.format == "onnx" else "model.xml")

    @property
    def model_bytes(self) -> int:
        """Bytes of the model itself (for IR: .xml + .bin), without the manifest."""
        return sum(m["bytes"] for n, m in self.manifest["files"].items() if n.startswith("model."))


ARTIFACT_TYPES = {cls.KIND: cls for cls in (Dataset, Checkpoint, ModelArtifact)}


def model_or_failure(build, *, variant: str, fmt: str, recipe: Dict[str, Any], lineage: Dict[str, Any]) -> ModelArtifact:
    """Run ``build() -> ModelArtifact``; on any error return a ModelArtifact recording the failure.

    One broken variant must not sink the run: it is recorded as failed (with the reason) and
    the others go on.
    """
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - the reason is kept and shown to the user
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        logging.getLogger(__name__).warning("variant %s failed: %s", variant, reason)
        return ModelArtifact.write(new_workdir("failed"), {
            "variant": variant, "format": fmt, "status": "failed", "reason": reason,
            "recipe": recipe, "lineage": lineage,
        })
