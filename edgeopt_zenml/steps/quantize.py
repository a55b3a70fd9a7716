from typing import Annotated

from zenml import step

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.config import QuantConfig
from edgeopt.precisions import quantize_model
from edgeopt_zenml.materializers import ModelArtifactMaterializer


@step(output_materializers=ModelArtifactMaterializer)
def quantize(model: ModelArtifact, dataset: Dataset, scheme: str, quant: dict, seed: int,
             variant: str) -> Annotated[ModelArtifact, "model"]:
    """A precision recipe (FP16, static/dynamic/accuracy-controlled INT8) applied to the FP32 export."""
    return quantize_model(model, scheme, dataset, QuantConfig.model_validate(quant), seed, variant=variant)
