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


_LOCKS: Dict[str, FileLock] = {}


def _lock(root: Path) -> FileLock:
    """The deploy folder's lock: one object per folder, so a holder may re-enter it."""
    key = str(Path(root).resolve())
    if key not in _LOCKS:
        _LOCKS[key] = FileLock(str(Path(root) / ".lock"), timeout=600)
    return _LOCKS[key]


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
    return sorted((p for p in vdir.iterdir() if p.is_dir() and (p / "manifest.json").is_file()), key=_created)


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
    with _lock(root):
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


def rollback(root: Path, *, uri: Optional[str] = None, alias: Optional[str] = None) -> Bundle:
    """Make the bundle deployed before the current one current again; with ``uri`` and ``alias``,
    move the registry alias back to that bundle's version too (one command, one lock)."""
    root = Path(root)
    with _lock(root):
        cur = current(root)
        if cur is None:
            raise LookupError(f"{root}: nothing is deployed, nothing to roll back")
        older = [b for b in bundles(root) if _created(b) < cur.manifest["created_at"]]
        if not older:
            raise LookupError(f"{root}: {cur.path.name} is the oldest bundle kept; nothing to roll back to")
        prev = Bundle(older[-1])
        prev.verify()
        if uri is not None and alias is not None:
            from edgeopt.tracking import set_alias

            set_alias(uri, prev.manifest["registered_model"], alias, prev.manifest["version"])
        _switch(root, prev.path)
    log.info("rollback: %s -> %s", cur.path.name, prev.path.name)
    return prev


def _created(bundle_dir: Path) -> float:
    return json.loads((bundle_dir / "manifest.json").read_text())["created_at"]


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
                         keep: int = 5) -> Optional[Bundle]:
    """Make the deploy folder serve the version ``alias`` points to (the registry is the source of truth).

    A no-op when ``current`` already holds that version; None when the alias does not exist.
    Everything in the bundle comes from the registry: the files of the version, and the metrics,
    runtime and runtime settings of the MLflow run that produced it.
    """
    from edgeopt.tracking import alias_version

    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with _lock(root):
        mv = alias_version(uri, name, alias)
        if mv is None:
            return None
        cur = current(root)
        if cur is not None and cur.manifest.get("registered_model") == name and cur.manifest.get("version") == str(mv.version):
            log.info("deploy: %s v%s is already current", name, mv.version)
            return cur
        return _deploy_version(uri, mv, name, alias, root, dataset_manifest, keep)


def _deploy_version(uri: str, mv, name: str, alias: str, root: Path, dataset_manifest: Dict[str, Any], keep: int) -> Bundle:
    import tempfile

    from edgeopt.artifacts import ModelArtifact
    from edgeopt.tracking import client_for, download_version

    run = client_for(uri).get_run(mv.run_id)
    settings = {k.removeprefix("runtime."): v for k, v in run.data.tags.items() if k.startswith("runtime.")}
    with tempfile.TemporaryDirectory() as tmp:
        model = ModelArtifact(download_version(uri, mv, Path(tmp)))
        model.verify()
        opened = model.model_file.name  # the file a runtime opens comes first
        files = sorted((n for n in model.manifest["files"] if n.startswith("model.")), key=lambda n: (n != opened, n))
        runtime = {"runtime": run.data.tags["runtime"], **settings, "threads": int(settings.get("threads", 1))}
        return deploy(model.path, root, name=f"{name}-v{mv.version}", model_files=files, runtime=runtime,
                      labels=dataset_manifest["classes"], keep=keep, info={
                          "registered_model": name, "version": str(mv.version), "alias": alias,
                          "variant": run.info.run_name, "run_id": mv.run_id, "metrics": run.data.metrics,
                          "lineage": model.manifest.get("lineage", {}),
                          "output": model.manifest.get("output", "logits"),
                          "preprocessing": {k: dataset_manifest[k] for k in ("input_shape", "mean", "std", "scale")},
                      })
