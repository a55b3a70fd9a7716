"""Deployment bundles, switched atomically; previous bundles kept for rollback.

Layout of the deploy folder::

    <root>/versions/<bundle>/   model.onnx | model.xml+model.bin, runtime.json, labels.json, manifest.json
    <root>/current              symlink -> versions/<bundle>   (replaced atomically with os.replace)
    <root>/.lock                serializes deployers

A bundle is written to a temporary folder beside ``versions/``, fsynced, verified against its
manifest, renamed into place, and only then does ``current`` move. A crash at any point leaves
``current`` pointing at a whole bundle (the old one or the new one), never at a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from filelock import FileLock

from edgeopt.artifacts import FolderArtifact, fsync_tree

log = logging.getLogger(__name__)


class Bundle(FolderArtifact):
    KIND = "bundle"

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["model_file"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bundles(root: Path) -> List[Path]:
    """Complete bundles, oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    return sorted((p for p in vdir.iterdir() if p.is_dir() and (p / "manifest.json").is_file()),
                  key=lambda p: json.loads((p / "manifest.json").read_text())["created_at"])


def current(root: Path) -> Optional[Bundle]:
    link = Path(root) / "current"
    return Bundle(link.resolve()) if link.is_symlink() and link.resolve().is_dir() else None


def _switch(root: Path, target: Path) -> None:
    tmp_link = root / f".current-{uuid.uuid4().hex}"
    os.symlink(Path("versions") / target.name, tmp_link)
    os.replace(tmp_link, root / "current")
    _fsync_dir(root)


def deploy(
    model_dir: Path,
    root: Path,
    *,
    name: str,
    model_files: List[str],
    runtime: Dict[str, Any],
    labels: List[str],
    info: Dict[str, Any],
    keep: int = 5,
) -> Bundle:
    """Write a bundle from ``model_files`` in ``model_dir`` and make it current; keep the last ``keep``."""
    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock"), timeout=600):
        stamp = time.strftime("%Y%m%dT%H%M%S")
        final = root / "versions" / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"
        tmp = root / "versions" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in model_files:
                shutil.copy2(Path(model_dir) / f, tmp / f)
            (tmp / "runtime.json").write_text(json.dumps(runtime, indent=2, sort_keys=True))
            (tmp / "labels.json").write_text(json.dumps(labels, indent=2))
            bundle = Bundle.write(tmp, {
                **info, "name": name, "model_file": model_files[0], "runtime": runtime["runtime"],
                "created_at": time.time(),
            })
            bundle.verify()
            fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _switch(root, final)
        _prune(root, keep)
    log.info("deploy: %s -> %s", final.name, root / "current")
    return Bundle(final)


def _prune(root: Path, keep: int) -> None:
    cur = current(root)
    old = [b for b in bundles(root) if cur is None or b.resolve() != cur.path]
    for b in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(b, ignore_errors=True)
    for stale in (root / "versions").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".current-*"):
        stale.unlink(missing_ok=True)


def deploy_from_registry(*, uri: str, name: str, alias: str, root: Path, dataset_manifest: Dict[str, Any],
                         promotion: Dict[str, Any], keep: int = 5) -> Bundle:
    """Deploy the model version that ``alias`` points to (the registry is the source of truth)."""
    import tempfile

    from edgeopt.artifacts import ModelArtifact
    from edgeopt.tracking import alias_version, download_version

    mv = alias_version(uri, name, alias)
    if mv is None:
        raise LookupError(f"registered model {name!r} has no alias {alias!r}; nothing to deploy")
    with tempfile.TemporaryDirectory() as tmp:
        model = ModelArtifact(download_version(uri, mv, Path(tmp)))
        model.verify()
        files = sorted(n for n in model.manifest["files"] if n.startswith("model."))
        files.sort(key=lambda n: not n.endswith((".onnx", ".xml")))  # the file a runtime opens comes first
        runtime = {"runtime": promotion["runtime"], **promotion.get("runtime_settings", {})}
        return deploy(model.path, root, name=f"{name}-v{mv.version}", model_files=files, runtime=runtime,
                      labels=dataset_manifest["classes"], keep=keep, info={
                          "registered_model": name, "version": str(mv.version), "alias": alias,
                          "variant": model.variant, "run_id": mv.run_id, "metrics": promotion.get("metrics", {}),
                          "lineage": model.manifest.get("lineage", {}),
                          "preprocessing": {k: dataset_manifest[k] for k in ("input_shape", "mean", "std", "scale")},
                      })
