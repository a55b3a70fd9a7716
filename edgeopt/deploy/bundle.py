"""A deployment bundle: one folder that a server loads as it is.

    model.onnx | model.xml+model.bin, runtime.json, labels.json, manifest.json

A bundle is identified by its registered model, version, the MLflow run that produced it and the
sha256 of its model files (:func:`edgeopt.artifacts.model_sha256`); all four are in its manifest
(``IDENTITY``). It is intact when its manifest lists exactly its files, each matching its sha256,
and it is usable when its runtime loads it and answers one input (:func:`check_loads`).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Dict, Optional

import numpy as np

from edgeopt.artifacts import MANIFEST, FolderArtifact

IDENTITY = ("registered_model", "version", "run_id", "model_sha256")


class DeployError(RuntimeError):
    """A deployment or rollback that cannot go on, said in one line."""


def inside(name: str) -> bool:
    """A manifest name that stays inside its folder: relative, no ``..``, no empty parts."""
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and not p.is_absolute() and all(s not in ("", ".", "..") for s in name.split("/"))


class Bundle(FolderArtifact):
    KIND = "bundle"

    @property
    def model_file(self) -> Path:
        name = self.manifest.get("model_file", "")
        if not inside(name):
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
            if not inside(name):
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
