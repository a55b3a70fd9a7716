"""Deployment bundles, switched atomically, with a history to roll back along.

Layout of the deploy folder (one registered model per folder)::

    <root>/versions/<bundle>/   model.onnx | model.xml+model.bin, runtime.json, labels.json, manifest.json
    <root>/current              symlink -> versions/<bundle>   (replaced atomically with os.replace)
    <root>/history.jsonl        one line per switch of ``current``, appended, never rewritten
    <root>/.lock                serializes deployers on this folder

A bundle is identified by its registered model, version, the MLflow run that produced it and the
sha256 of its model files (``model_sha256``); all four are in its manifest and in every history
line. It is written to a temporary folder beside ``versions/``, fsynced, verified against its
manifest, loaded once by its runtime, renamed into place, and only then does ``current`` move. A
crash at any point leaves ``current`` pointing at a whole bundle (the old one or the new one).

Each history line records the switch (``to``, ``from``) and ``previous``: the bundle that a
rollback from ``to`` returns to (for a deploy, what was served before it; for a rollback, what was
served before the bundle it restored). The line is written before the link moves, so a crash
between the two leaves a line whose ``to`` never became current, which readers ignore: they
follow the latest line whose ``to`` is the bundle in question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from filelock import FileLock

from edgeopt.artifacts import MANIFEST, FolderArtifact, fsync_tree, sha256_file

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
IDENTITY = ("registered_model", "version", "run_id", "model_sha256")


class DeployError(RuntimeError):
    """A deployment or rollback that cannot go on, said in one line."""


def model_sha256(files: Dict[str, Dict[str, Any]]) -> str:
    """One sha256 for a model's files (``model.*`` of a manifest's ``files``): the same for the
    variant's MLflow artifact and for every bundle made of it."""
    lines = "".join(f"{n}\t{m['sha256']}\n" for n, m in sorted(files.items()) if n.startswith("model."))
    if not lines:
        raise ValueError("the manifest lists no model.* file")
    return hashlib.sha256(lines.encode()).hexdigest()


def _inside(name: str) -> bool:
    """A manifest name that stays inside its folder: relative, no ``..``, no empty parts."""
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and not p.is_absolute() and all(s not in ("", ".", "..") for s in name.split("/"))


class Bundle(FolderArtifact):
    KIND = "bundle"

    @property
    def model_file(self) -> Path:
        name = self.manifest.get("model_file", "")
        if not _inside(name):
            raise ValueError(f"{self.path}: manifest model_file {name!r} is outside the bundle")
        return self.path / name

    @property
    def identity(self) -> Dict[str, Optional[str]]:
        return {k: self.manifest.get(k) for k in IDENTITY}

    def verify(self) -> None:
        """Every file in the folder is listed, every listed file is inside the folder, present and
        matches its sha256; the model file, runtime.json and labels.json are among them."""
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"{self.path}: manifest.json lists no files")
        for name in files:
            if not _inside(name):
                raise ValueError(f"{self.path}: manifest.json lists {name!r}, outside the bundle")
        for name in (self.manifest.get("model_file", ""), "runtime.json", "labels.json"):
            if name not in files:
                raise ValueError(f"{self.path}: {name or 'model_file'} is not listed in manifest.json")
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_symlink():
                raise ValueError(f"{self.path}: {rel} is a symlink")
            if p.is_file() and rel != MANIFEST and rel not in files:
                raise ValueError(f"{self.path}: file {rel} is not listed in manifest.json")
        super().verify()


def check_loads(bundle: Bundle) -> None:
    """Load the bundle with its runtime and run one zero input: what the server will do first."""
    from edgeopt.runtimes import make_predictor

    path = bundle.path
    try:
        spec = json.loads((path / "runtime.json").read_text())
        labels = json.loads((path / "labels.json").read_text())
        shape = bundle.manifest["preprocessing"]["input_shape"]
        predictor = make_predictor(spec["runtime"], bundle.model_file, int(spec.get("threads", 1)))
        out = np.asarray(predictor.predict_batched(np.zeros((1, *shape), np.float32)))
    except Exception as err:  # noqa: BLE001 - whatever the runtime says, in one line
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise DeployError(f"{path.name}: does not load: {type(err).__name__}: {text}") from None
    if out.shape != (1, len(labels)) or not np.isfinite(out).all():
        raise DeployError(f"{path.name}: the model answers shape {list(out.shape)} (finite: {bool(np.isfinite(out).all())}) "
                          f"for one input; labels.json names {len(labels)} classes")


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


def _manifest(bundle_dir: Path) -> Dict[str, Any]:
    """A bundle folder's manifest, or {} when it is missing or unreadable (such a folder is skipped)."""
    try:
        m = json.loads((bundle_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _created(bundle_dir: Path) -> float:
    value = _manifest(bundle_dir).get("created_at", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def bundles(root: Path) -> List[Path]:
    """Bundle folders (with a manifest), oldest first."""
    vdir = Path(root) / "versions"
    if not vdir.is_dir():
        return []
    found = (p for p in vdir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
    return sorted(found, key=_created)


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


def _current_name(root: Path) -> Optional[str]:
    link = root / "current"
    if link.is_symlink():
        return Path(os.readlink(link)).name
    if link.exists():
        raise DeployError(f"{link}: is a {'folder' if link.is_dir() else 'file'}, not the link edgeopt switches "
                          "(copied with cp -L?); move it away")
    return None


def _switch(root: Path, target: Bundle, event: str, previous: Optional[str]) -> None:
    """Record the switch in the history, then point ``current`` at ``target`` (atomically)."""
    _append_history(root, {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, "to": target.path.name,
        "from": _current_name(root), "previous": previous, **target.identity,
    })
    tmp_link = root / f".current-{uuid.uuid4().hex}"
    os.symlink(Path("versions") / target.path.name, tmp_link)
    os.replace(tmp_link, root / "current")
    _fsync_dir(root)


def check_root_model(root: Path, name: str) -> None:
    """Refuse a deploy folder that holds another registered model's bundles."""
    for b in bundles(root):
        other = _manifest(b).get("registered_model")
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
        if not f.startswith("model.") or not _inside(f) or "/" in f:
            raise DeployError(f"model file name {f!r} is not a plain model.* file name")
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with _lock(root):
        check_root_model(root, info["registered_model"])
        previous = _current_name(root)
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
        _switch(root, Bundle(final), "deploy", previous)
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


# ---------------------------------------------------------------------------------------- rollback


def _latest_entries(root: Path) -> Dict[str, Dict[str, Any]]:
    """For each bundle name, the latest history line that switched to it."""
    return {e["to"]: e for e in history(root)}


def served_before(root: Path, name: str) -> Iterator[str]:
    """The bundles served before ``name``, most recent first, following the history."""
    latest, seen = _latest_entries(root), {name}
    while (entry := latest.get(name)) is not None:
        prev = entry.get("previous")
        if not isinstance(prev, str) or prev in seen:
            return
        yield prev
        seen.add(prev)
        name = prev


@dataclass
class RolledBack:
    """What a rollback did: the bundle now current, the model it rolled away from, what it skipped."""

    bundle: Bundle
    from_bundle: str
    from_version: Optional[str]
    blocked_sha256: Optional[str]
    skipped: List[str] = field(default_factory=list)


def rollback(root: Path, *, uri: str, name: str, alias: str, lease_seconds: Optional[float] = None) -> RolledBack:
    """Serve the bundle served before the current one again (following the history; older intact
    bundles when that one is gone or broken), move the registry alias back to its version, and block
    the model rolled away from so that no promotion brings it back (``run.py unblock`` clears it).

    Runs under the registry's promotion lease (so it cannot interleave with a promotion on any
    host) and the deploy folder's lock. The registry is written first: a crash before the switch
    leaves the alias on the restored version, and the next run's deploy step serves it.
    """
    from edgeopt import registry
    from edgeopt.track.runs import client_for, set_alias

    root = Path(root)
    lease = registry.Lease(uri, name) if lease_seconds is None else registry.Lease(uri, name, ttl=lease_seconds)
    with lease, _lock(root):
        check_root_model(root, name)
        cur = _current_name(root)
        if cur is None:
            raise LookupError(f"{root}: nothing is deployed, nothing to roll back")
        latest = _latest_entries(root)
        cur_ident = _manifest(root / "versions" / cur) or latest.get(cur, {})
        cur_sha = cur_ident.get("model_sha256")
        blocked = registry.blocked(uri, name)
        client = client_for(uri)
        chain = list(served_before(root, cur))
        older = [b.name for b in reversed(bundles(root)) if b.name not in chain and b.name != cur
                 and _created(b) < float(cur_ident.get("created_at", float("inf")))]
        target, skipped = None, []
        for cand in chain + older:
            why = _unusable(root / "versions" / cand, name, cur_sha, blocked, client)
            if why is None:
                target = Bundle(root / "versions" / cand)
                break
            skipped.append(f"{cand}: {why}")
            log.warning("rollback: skipping %s: %s", cand, why)
        if target is None:
            raise LookupError(f"{root}: no intact bundle to roll back to from {cur}"
                              + (f" (skipped {len(skipped)}: {skipped[0]})" if skipped else ""))
        t = target.manifest
        note = (f"rolled back {time.strftime('%Y-%m-%dT%H:%M:%S%z')} from v{cur_ident.get('version')} ({cur}) "
                f"to v{t['version']} ({target.path.name})")
        from_version = _registered(client, name, cur_ident)
        lease.check()
        if cur_sha:
            registry.block(uri, name, cur_sha, from_version, note)
        lease.check()
        set_alias(uri, name, alias, t["version"])
        _switch(root, target, "rollback", latest.get(target.path.name, {}).get("previous"))
    log.info("rollback: %s -> %s; %s", cur, target.path.name, note)
    return RolledBack(bundle=target, from_bundle=cur, from_version=cur_ident.get("version"), blocked_sha256=cur_sha,
                      skipped=skipped)


def _registered(client, name: str, ident: Dict[str, Any]) -> Optional[str]:
    """The bundle's version number if the registry holds that version with the bundle's run id, else None."""
    version = ident.get("version")
    if version is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as err:
        if str(err.error_code) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(version) if mv.run_id == ident.get("run_id") else None


def _unusable(path: Path, name: str, cur_sha: Optional[str], blocked: Dict[str, str], client) -> Optional[str]:
    """Why ``path`` cannot be rolled back to, or None when it can."""
    try:
        bundle = Bundle(path)
        bundle.verify()
    except (OSError, ValueError) as err:
        return str(err).replace(f"{path}: ", "")
    m = bundle.manifest
    if m.get("registered_model") != name:
        return f"a bundle of {m.get('registered_model')!r}"
    if m.get("model_sha256") is not None and m.get("model_sha256") == cur_sha:
        return "the same model as the current bundle"
    if m.get("model_sha256") in blocked:
        return f"its model was rolled back before ({blocked[m['model_sha256']]})"
    if _registered(client, name, m) is None:
        return f"the registry holds no v{m.get('version')} of run {m.get('run_id')}"
    try:
        check_loads(bundle)
    except DeployError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------- from the registry


def serving_info(dataset_manifest: Dict[str, Any], output: str = "logits") -> Dict[str, Any]:
    """What a bundle needs besides the model, from the dataset the model was trained and measured on."""
    return {"labels": list(dataset_manifest["classes"]), "output": output,
            "preprocessing": {k: dataset_manifest[k] for k in ("input_shape", "mean", "std", "scale")}}


def deploy_from_registry(*, uri: str, name: str, alias: str, root: Path, keep: int = 5) -> Optional[Bundle]:
    """Make the deploy folder serve the version ``alias`` points to (the registry is the source of truth).

    A no-op when ``current`` already holds that very model (name, version, run id and model sha256
    all equal, and the bundle intact); a switch back when an intact bundle of it is kept; else a new
    bundle, built from the registry alone: the version's files, and the labels, preprocessing,
    runtime and metrics logged with the version's own run. None when the alias does not exist.
    """
    from edgeopt.registry.lease import run_model_sha256
    from edgeopt.track.runs import alias_version

    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with _lock(root):
        check_root_model(root, name)
        mv = alias_version(uri, name, alias)
        if mv is None:
            return None
        ident = {"registered_model": name, "version": str(mv.version), "run_id": mv.run_id,
                 "model_sha256": mv.tags.get("model_sha256") or run_model_sha256(uri, mv.run_id)}
        cur = current(root)
        if cur is not None and cur.identity == ident:
            try:
                cur.verify()
                log.info("deploy: %s v%s is already current", name, mv.version)
                return cur
            except ValueError as err:
                log.warning("deploy: the current bundle is damaged (%s); deploying v%s again", err, mv.version)
        for b in reversed(bundles(root)):
            if {k: _manifest(b).get(k) for k in IDENTITY} != ident:
                continue
            try:
                kept = Bundle(b)
                kept.verify()
                check_loads(kept)
            except (ValueError, DeployError) as err:
                log.warning("deploy: kept bundle %s is not usable (%s)", b.name, err)
                continue
            _switch(root, kept, "deploy", _current_name(root))
            log.info("deploy: %s v%s -> %s (kept bundle)", name, mv.version, b.name)
            return kept
        return _deploy_version(uri, mv, ident, alias, root, keep)


def _deploy_version(uri: str, mv, ident: Dict[str, Any], alias: str, root: Path, keep: int) -> Bundle:
    import tempfile

    from edgeopt.artifacts import ModelArtifact
    from edgeopt.registry.lease import load_serving
    from edgeopt.track.runs import client_for, download_version

    run = client_for(uri).get_run(mv.run_id)
    serving = load_serving(uri, mv.run_id, str(mv.version))
    settings = {k.removeprefix("runtime."): v for k, v in run.data.tags.items() if k.startswith("runtime.")}
    with tempfile.TemporaryDirectory() as tmp:
        model = ModelArtifact(download_version(uri, mv, Path(tmp)))
        model.verify()
        if model_sha256(model.manifest["files"]) != ident["model_sha256"]:
            raise DeployError(f"{ident['registered_model']} v{mv.version}: its files do not match the model_sha256 "
                              "recorded at registration")
        opened = model.model_file.name  # the file a runtime opens comes first
        files = sorted((n for n in model.manifest["files"] if n.startswith("model.")), key=lambda n: (n != opened, n))
        runtime = {"runtime": run.data.tags["runtime"], **settings, "threads": int(settings.get("threads", 1))}
        return deploy(model.path, root, name=f"{ident['registered_model']}-v{mv.version}", model_files=files,
                      runtime=runtime, labels=serving["labels"], keep=keep, info={
                          **ident, "alias": alias, "variant": run.info.run_name, "metrics": run.data.metrics,
                          "lineage": model.manifest.get("lineage", {}),
                          "output": serving.get("output", model.manifest.get("output", "logits")),
                          "preprocessing": serving["preprocessing"],
                      })
