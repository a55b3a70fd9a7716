"""The deploy folder: bundles switched atomically, with a history to roll back along.

Layout of the deploy folder (one registered model per folder)::

    <root>/versions/<bundle>/   a bundle (:mod:`edgeopt.deploy.bundle`)
    <root>/current              symlink -> versions/<bundle>   (replaced atomically with os.replace)
    <root>/history.jsonl        one line per switch of ``current``, appended, never rewritten
    <root>/.lock                serializes deployers on this folder

A bundle is written to a temporary folder beside ``versions/``, fsynced, verified against its
manifest, loaded once by its runtime, renamed into place, and only then does ``current`` move. A
crash at any point leaves ``current`` pointing at a whole bundle (the old one or the new one).

Each history line records the switch (``to``, ``from``), the bundle's identity, and ``previous``:
the bundle that a rollback from ``to`` returns to (for a deploy, what was served before it; for a
rollback, what was served before the bundle it restored). The line is written before the link
moves, so a crash between the two leaves a line whose ``to`` never became current, which readers
ignore: they follow the latest line whose ``to`` is the bundle in question.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from filelock import FileLock

from edgeopt.artifacts import MANIFEST, fsync_tree, model_sha256, sha256_file
from edgeopt.deploy.bundle import Bundle, DeployError, check_loads, inside

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"

_LOCKS: Dict[str, FileLock] = {}


def lock(root: Path) -> FileLock:
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


def manifest_of(bundle_dir: Path) -> Dict[str, Any]:
    """A bundle folder's manifest, or {} when it is missing or unreadable (such a folder is skipped)."""
    try:
        m = json.loads((bundle_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def created_at(bundle_dir: Path) -> float:
    value = manifest_of(bundle_dir).get("created_at", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def bundles(root: Path) -> List[Path]:
    """Bundle folders (with a manifest), oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    found = (p for p in vdir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
    return sorted(found, key=created_at)


def current(root: Path) -> Optional[Bundle]:
    link = Path(root) / "current"
    return Bundle(link.resolve()) if link.is_symlink() and link.resolve().is_dir() else None


def history(root: Path) -> List[Dict[str, Any]]:
    """The deploy history, oldest first (a line cut short by a crash is skipped)."""
    try:
        lines = (Path(root) / HISTORY).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("to"), str):
            out.append(entry)
    return out


def latest_switches(root: Path) -> Dict[str, Dict[str, Any]]:
    """Each bundle's latest switch to it: bundle name -> its last history line (see the module's docstring)."""
    return {e["to"]: e for e in history(root)}


def served_before(root: Path, name: str) -> Iterator[str]:
    """The bundles served before ``name``, most recent first, following the history."""
    latest, seen = latest_switches(root), {name}
    while (entry := latest.get(name)) is not None:
        prev = entry.get("previous")
        if not isinstance(prev, str) or prev in seen:
            return
        yield prev
        seen.add(prev)
        name = prev


def _append_history(root: Path, entry: Dict[str, Any]) -> None:
    path = root / HISTORY
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a crash: start on a line of our own
                f.write(b"\n")
        f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def current_name(root: Path) -> Optional[str]:
    link = root / "current"
    if link.is_symlink():
        return Path(os.readlink(link)).name
    if link.exists():
        raise DeployError(f"{link}: is a {'folder' if link.is_dir() else 'file'}, not the link edgeopt switches "
                          "(copied with cp -L?); move it away")
    return None


def switch(root: Path, target: Bundle, event: str, previous: Optional[str]) -> None:
    """Record the switch in the history, then point ``current`` at ``target`` (atomically)."""
    _append_history(root, {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, "to": target.path.name,
        "from": current_name(root), "previous": previous, **target.identity,
    })
    tmp_link = root / f".current-{uuid.uuid4().hex}"
    os.symlink(Path("versions") / target.path.name, tmp_link)
    os.replace(tmp_link, root / "current")
    _fsync_dir(root)


def check_root_model(root: Path, name: str) -> None:
    """Refuse a deploy folder that holds another registered model's bundles."""
    for b in bundles(root):
        other = manifest_of(b).get("registered_model")
        if other is not None and other != name:
            raise DeployError(f"{root}: holds bundles of registered model {other!r} (versions/{b.name}); one deploy "
                              f"root serves one model: give {name!r} a deploy.root of its own")


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
    """Write a bundle from ``model_files`` in ``model_dir`` and make it current; keep the last ``keep``.

    ``info`` goes into the manifest and must hold ``registered_model`` and ``preprocessing``
    (``input_shape``, ``mean``, ``std``, ``scale``); the bundle is loaded once by its runtime before
    ``current`` moves.
    """
    root = Path(root)
    for f in model_files:
        if not f.startswith("model.") or not inside(f) or "/" in f:
            raise DeployError(f"model file name {f!r} is not a plain model.* file name")
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with lock(root):
        check_root_model(root, info["registered_model"])
        previous = current_name(root)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        final = root / "versions" / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"
        tmp = root / "versions" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in model_files:
                shutil.copy2(Path(model_dir) / f, tmp / f)
            (tmp / "runtime.json").write_text(json.dumps(runtime, indent=2, sort_keys=True))
            (tmp / "labels.json").write_text(json.dumps(labels, indent=2))
            sha = model_sha256({f: {"sha256": sha256_file(tmp / f)} for f in model_files})
            if info.get("model_sha256", sha) != sha:
                raise DeployError(f"{name}: the model files do not match model_sha256 {info['model_sha256']}")
            bundle = Bundle.write(tmp, {
                **info, "name": name, "model_file": model_files[0], "runtime": runtime["runtime"],
                "created_at": time.time(), "model_sha256": sha,
            })
            bundle.verify()
            check_loads(bundle)
            fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        switch(root, Bundle(final), "deploy", previous)
        _prune(root, keep)
    log.info("deploy: %s -> %s", final.name, root / "current")
    return Bundle(final)


def _prune(root: Path, keep: int) -> None:
    """Keep the current bundle and the ``keep - 1`` newest others. A bundle leaves ``versions/`` by one
    rename before it is deleted, so an interrupted prune never leaves a half bundle behind."""
    cur = current(root)
    old = [b for b in bundles(root) if cur is None or b.resolve() != cur.path]
    for b in old[: max(0, len(old) - (keep - 1))]:
        trash = root / "versions" / f".trash-{uuid.uuid4().hex}"
        os.rename(b, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for pattern in (".tmp-*", ".trash-*"):
        for stale in (root / "versions").glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".current-*"):
        stale.unlink(missing_ok=True)
