"""JSON records (pydantic) with metadata and a Markdown view in the ZenML dashboard."""

from __future__ import annotations

import os
from typing import Any, Dict

from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.pydantic_materializer import PydanticMaterializer

from edgeopt.measure.evaluate import Evaluation
from edgeopt.select.pareto import Selection


class EvaluationMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES = (Evaluation,)
    ASSOCIATED_ARTIFACT_TYPE = ArtifactType.DATA_ANALYSIS

    def extract_metadata(self, data: Evaluation) -> Dict[str, Any]:
        ok = [r for r in data.results if r.ok]
        return {
            "variants": len(data.results),
            "failed": len(data.results) - len(ok),
            "cpu_fingerprint": str(data.fingerprint["id"]),
            "reference": data.reference.variant,
            "reference_accuracy": data.reference.accuracy,
            "reference_p50_ms": data.reference.latency_p50_ms,
            "best_p50_ms": min((r.metrics["latency_p50_ms"] for r in ok), default=0.0),
        }

    def save_visualizations(self, data: Evaluation) -> Dict[str, VisualizationType]:
        rows = ["| variant | status | accuracy | p50 ms | p95 ms | size kB |", "|---|---|---|---|---|---|"]
        for r in data.results:
            m = r.metrics
            rows.append(
                f"| {r.variant} | {r.status} | {m.get('accuracy', float('nan')):.4f} | "
                f"{m.get('latency_p50_ms', float('nan')):.3f} | {m.get('latency_p95_ms', float('nan')):.3f} | "
                f"{1e3 * m.get('size_mb', float('nan')):.1f} |"
            )
        path = os.path.join(self.uri, "evaluation.md")
        with self.artifact_store.open(path, "w") as f:
            f.write("\n".join(rows) + "\n")
        return {path: VisualizationType.MARKDOWN}


class SelectionMaterializer(PydanticMaterializer):
    ASSOCIATED_TYPES = (Selection,)
    ASSOCIATED_ARTIFACT_TYPE = ArtifactType.DATA_ANALYSIS

    def extract_metadata(self, data: Selection) -> Dict[str, Any]:
        return {"winner": data.winner or "none", "objective": data.objective, "front": ", ".join(data.front),
                "reason": data.reason}
