"""One materializer for every folder artifact: copy the files, keep the manifest, show metadata.

The content hash is the manifest's (sha256 of every file), so ZenML's cache sees an unchanged
dataset or model as unchanged even when it was rebuilt by a step that always runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from edgeopt.artifacts import Checkpoint, Dataset, FolderArtifact, ModelArtifact, new_workdir
from edgeopt.select.report import PlotImage


class FolderMaterializer(BaseMaterializer):
    SKIP_REGISTRATION: ClassVar[bool] = True  # an abstract base: the subclasses register
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = ()
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA
    METADATA_KEYS: ClassVar[Tuple[str, ...]] = ()

    def load(self, data_type: Type[FolderArtifact]) -> FolderArtifact:
        dest = new_workdir(data_type.KIND)
        for src_dir, _, files in fileio.walk(self.uri):
            rel = os.path.relpath(str(src_dir), str(self.uri))
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                fileio.copy(os.path.join(str(src_dir), str(f)), str(dest / rel / str(f)), overwrite=True)
        return data_type(dest)

    def save(self, data: FolderArtifact) -> None:
        for p in sorted(Path(data.path).rglob("*")):
            if p.is_file():
                target = os.path.join(self.uri, p.relative_to(data.path).as_posix())
                fileio.makedirs(os.path.dirname(target))
                fileio.copy(str(p), target, overwrite=True)

    def compute_content_hash(self, data: FolderArtifact) -> Optional[str]:
        return data.content_hash

    def extract_metadata(self, data: FolderArtifact) -> Dict[str, Any]:
        m = data.manifest
        meta = {k: m[k] for k in self.METADATA_KEYS if isinstance(m.get(k), (str, int, float, bool))}
        meta["size_bytes"] = data.size_bytes
        meta["files"] = len(m["files"])
        return meta


class DatasetMaterializer(FolderMaterializer):
    ASSOCIATED_TYPES = (Dataset,)
    METADATA_KEYS = ("source", "data_hash", "seed")

    def extract_metadata(self, data: Dataset) -> Dict[str, Any]:
        return {**super().extract_metadata(data), "classes": len(data.classes),
                "input_shape": str(data.input_shape), **{f"n_{k}": v for k, v in data.manifest["sizes"].items()}}


class CheckpointMaterializer(FolderMaterializer):
    ASSOCIATED_TYPES = (Checkpoint,)
    ASSOCIATED_ARTIFACT_TYPE = ArtifactType.MODEL
    METADATA_KEYS = ("role", "params", "macs", "val_accuracy", "prune_ratio")

    def extract_metadata(self, data: Checkpoint) -> Dict[str, Any]:
        return {**super().extract_metadata(data), "arch": data.manifest["arch"]["name"]}


class ModelArtifactMaterializer(FolderMaterializer):
    ASSOCIATED_TYPES = (ModelArtifact,)
    ASSOCIATED_ARTIFACT_TYPE = ArtifactType.MODEL
    METADATA_KEYS = ("variant", "format", "status", "reason", "opset", "params", "macs", "method", "parity_max_abs_diff")

    def extract_metadata(self, data: ModelArtifact) -> Dict[str, Any]:
        meta = super().extract_metadata(data)
        if not data.failed:
            meta["model_bytes"] = data.model_bytes
        return meta


class ImageMaterializer(FolderMaterializer):
    ASSOCIATED_TYPES = (PlotImage,)
    ASSOCIATED_ARTIFACT_TYPE = ArtifactType.DATA_ANALYSIS

    def save_visualizations(self, data: PlotImage) -> Dict[str, VisualizationType]:
        return {os.path.join(self.uri, data.manifest["image"]): VisualizationType.IMAGE}
