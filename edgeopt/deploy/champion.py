"""The deploy folder kept in step with the registry's alias (``champion``): serve the version the
alias names (:func:`deploy_from_registry`, the registry is the source of truth), and roll back to
what was served before, moving the alias back and blocking the model rolled away from
(:func:`rollback`)."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from mlflow.exceptions import MlflowException

from edgeopt.artifacts import ModelArtifact, model_sha256
from edgeopt.deploy.bundle import IDENTITY, Bundle, DeployError, check_loads
from edgeopt.deploy.folder import (
    bundles,
    check_root_model,
    created_at,
    current,
    current_name,
    deploy,
    latest_switches,
    lock,
    manifest_of,
    served_before,
    switch,
)
from edgeopt.registry.lease import Lease, block, blocked
from edgeopt.registry.versions import alias_version, download_version, load_serving, run_model_sha256, set_alias
from edgeopt.track.uri import client_for

log = logging.getLogger(__name__)


def deploy_from_registry(*, uri: str, name: str, alias: str, root: Path, keep: int = 5) -> Optional[Bundle]:
    """Make the deploy folder serve the version ``alias`` points to (the registry is the source of truth).

    A no-op when ``current`` already holds that very model (name, version, run id and model sha256
    all equal, and the bundle intact); a switch back when an intact bundle of it is kept; else a new
    bundle, built from the registry alone: the version's files, and the labels, preprocessing,
    runtime and metrics logged with the version's own run. None when the alias does not exist.
    """
    root = Path(root)
    (root / "versions").mkdir(parents=True, exist_ok=True)
    with lock(root):
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
            if {k: manifest_of(b).get(k) for k in IDENTITY} != ident:
                continue
            try:
                kept = Bundle(b)
                kept.verify()
                check_loads(kept)
            except (ValueError, DeployError) as err:
                log.warning("deploy: kept bundle %s is not usable (%s)", b.name, err)
                continue
            switch(root, kept, "deploy", current_name(root))
            log.info("deploy: %s v%s -> %s (kept bundle)", name, mv.version, b.name)
            return kept
        return _deploy_version(uri, mv, ident, alias, root, keep)


def _deploy_version(uri: str, mv, ident: Dict[str, Any], alias: str, root: Path, keep: int) -> Bundle:
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


# ---------------------------------------------------------------------------------------- rollback


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
    the model rolled away from so that no promotion brings it back (``edgeopt unblock`` clears it).

    Runs under the registry's promotion lease (so it cannot interleave with a promotion on any
    host) and the deploy folder's lock. The registry is written first: a crash before the switch
    leaves the alias on the restored version, and the next run's deploy step serves it.
    """
    root = Path(root)
    lease = Lease(uri, name) if lease_seconds is None else Lease(uri, name, ttl=lease_seconds)
    with lease, lock(root):
        check_root_model(root, name)
        cur = current_name(root)
        if cur is None:
            raise LookupError(f"{root}: nothing is deployed, nothing to roll back")
        latest = latest_switches(root)
        cur_ident = manifest_of(root / "versions" / cur) or latest.get(cur, {})
        cur_sha = cur_ident.get("model_sha256")
        blocked_now = blocked(uri, name)
        client = client_for(uri)
        chain = list(served_before(root, cur))
        older = [b.name for b in reversed(bundles(root)) if b.name not in chain and b.name != cur
                 and created_at(b) < float(cur_ident.get("created_at", float("inf")))]
        target, skipped = None, []
        for cand in chain + older:
            why = _unusable(root / "versions" / cand, name, cur_sha, blocked_now, client)
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
            block(uri, name, cur_sha, from_version, note)
        lease.check()
        set_alias(uri, name, alias, t["version"])
        switch(root, target, "rollback", latest.get(target.path.name, {}).get("previous"))
    log.info("rollback: %s -> %s; %s", cur, target.path.name, note)
    return RolledBack(bundle=target, from_bundle=cur, from_version=cur_ident.get("version"), blocked_sha256=cur_sha,
                      skipped=skipped)


def _registered(client, name: str, ident: Dict[str, Any]) -> Optional[str]:
    """The bundle's version number if the registry holds that version with the bundle's run id, else None."""
    version = ident.get("version")
    if version is None:
        return None
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
