"""The project's artifact types: plain folders of files with a ``manifest.json``.

Nothing here is a pickle of a live object. Each artifact is a folder holding its files and a
manifest (kind, sha256 and size of every file, plus the recipe and lineage that produced it), so
it can be copied, hashed, verified and loaded by anyone with the folder.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple, TypeVar

import numpy as np

from edgeopt import formats
from edgeopt.artifacts.npyrows import NpyRows

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(files: Dict[str, Dict[str, Any]]) -> str:
    """One sha256 for a model's files (``model.*`` of a manifest's ``files``): the same for the
    variant's MLflow artifact and for every bundle made of it."""
    lines = "".join(f"{n}\t{m['sha256']}\n" for n, m in sorted(files.items()) if n.startswith("model."))
    if not lines:
        raise ValueError("the manifest lists no model.* file")
    return hashlib.sha256(lines.encode()).hexdigest()


_process_root: Optional[Path] = None
_scopes: List[Path] = []


def new_workdir(prefix: str) -> Path:
    """A fresh local folder for an artifact being built, inside the innermost :func:`workdir_scope`
    (removed when it ends) or else inside this process's ``<temp dir>/edgeopt-<pid>-*`` folder
    (removed when the process exits)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_scopes[-1] if _scopes else process_workroot()))


def process_workroot() -> Path:
    """This process's ``<temp dir>/edgeopt-<pid>-*`` folder, made on first use and removed at exit.

    Folders left by processes that are gone (killed before their exit hooks ran) are removed when
    the next one is made, so a nightly job cannot fill the disk with them.
    """
    global _process_root
    if _process_root is None or not _process_root.is_dir():
        remove_orphaned_workroots()
        _process_root = Path(tempfile.mkdtemp(prefix=f"edgeopt-{os.getpid()}-"))
        atexit.register(shutil.rmtree, _process_root, True)
    return _process_root


def remove_orphaned_workroots(tmp: Optional[Path] = None) -> List[Path]:
    """Remove the ``edgeopt-<pid>-*`` folders under ``tmp`` (the system temp dir) whose process is gone."""
    removed = []
    for p in Path(tmp or tempfile.gettempdir()).glob("edgeopt-*-*"):
        pid = p.name.split("-")[1]
        if p.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def workdir_scope() -> Iterator[Path]:
    """Every :func:`new_workdir` made inside goes into one folder, removed when the block ends
    (a pipeline run: the steps' inputs and outputs are in the artifact store by then)."""
    scope = Path(tempfile.mkdtemp(prefix="run-", dir=process_workroot()))
    _scopes.append(scope)
    try:
        yield scope
    finally:
        _scopes.remove(scope)
        shutil.rmtree(scope, ignore_errors=True)


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


A = TypeVar("A", bound="FolderArtifact")


class FolderArtifact:
    """A folder with a manifest. Subclasses name their ``KIND`` and add typed accessors."""

    KIND: ClassVar[str] = "artifact"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest: Dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("kind") != self.KIND:
            raise ValueError(f"{self.path}: manifest kind {self.manifest.get('kind')!r}, expected {self.KIND!r}")

    @classmethod
    def write(cls: type[A], path: Path, info: Dict[str, Any]) -> A:
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

    def copy_to(self: A, dest: Path) -> A:
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
    """Train/val/test images, kept as uint8 on disk and read a batch at a time.

    Files per split: ``images_<split>.npy`` (N x C x H x W uint8, at the configured size) and
    ``y_<split>.npy`` (int64). The manifest holds ``scale``, ``mean`` and ``std``: the model's input
    is ``(images / scale - mean) / std`` per channel, computed per batch by :meth:`normalize`. uint8 is a
    quarter of float32's bytes, and reading only a batch's rows keeps a dataset larger than memory
    trainable; :meth:`split` loads a whole split for small data and older callers.
    """

    KIND = "dataset"

    def size(self, split: str) -> int:
        return int(self.manifest["sizes"][split])

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.path / f"y_{split}.npy")

    def raw(self, split: str) -> np.ndarray:
        """The split's uint8 images, memory-mapped (pages touched stay in this process's RSS: prefer batches)."""
        return np.load(self.path / f"images_{split}.npy", mmap_mode="r")

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.manifest["mean"], np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.manifest["std"], np.float32)

    @property
    def scale(self) -> float:
        """What a pixel's uint8 value is divided by to lie in [0, 1]: 255, or 16 for digits' 0..16 values."""
        return float(self.manifest["scale"])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 images (N x C x H x W, or C x H x W) -> the model's float32 input."""
        x = np.asarray(x, dtype=np.float32) / np.float32(self.scale)
        return ((x - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32, copy=False)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                normalized: bool = True, limit: Optional[int] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """``(x, y)`` batches of the split, reading only each batch's rows from disk.

        ``shuffle`` draws a seeded permutation of the split; ``limit`` keeps its first ``limit``
        images. Within a batch the rows come in file order (sorted indices read faster), with ``y``
        in the same order. ``x`` is normalized float32, or the stored uint8 when ``normalized`` is false.
        """
        n = self.size(split)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        order = order[:limit] if limit is not None else order
        y = self.labels(split)
        rows = NpyRows(self.path / f"images_{split}.npy")
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])
            x = rows.read(idx)
            yield (self.normalize(x) if normalized else x), y[idx]

    def sample(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        """``n`` normalized images drawn without replacement (seeded), e.g. for calibration; all if fewer."""
        size = self.size(split)
        idx = np.sort(np.random.default_rng(seed).permutation(size)[: min(n, size)])
        return self.normalize(NpyRows(self.path / f"images_{split}.npy").read(idx))

    def split(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """The whole split as normalized float32 and its labels, in memory (4 bytes a pixel: small data only)."""
        return self.normalize(np.load(self.path / f"images_{name}.npy")), self.labels(name)

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

    @property
    def onnx_file(self) -> Path | None:
        """The model file of a base brought as ONNX (it has no torch weights), else None."""
        return self.path / "model.onnx" if "model.onnx" in self.manifest["files"] else None


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
        return formats.get(self.format).model_file(self.path)

    @property
    def model_bytes(self) -> int:
        """Bytes of the model itself (for IR: .xml + .bin), without the manifest."""
        return sum(m["bytes"] for n, m in self.manifest["files"].items() if n.startswith("model."))


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
