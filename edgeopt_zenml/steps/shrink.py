from typing import Annotated

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.shrink.base import get
from edgeopt.shrink.run import shrink_base
from edgeopt_zenml.materializers import CheckpointMaterializer


@step(output_materializers=CheckpointMaterializer)
def shrink(base: Checkpoint, kd_teacher: Checkpoint, dataset: Dataset, technique: str, amount: float, options: dict,
           seed: int) -> Annotated[Checkpoint, "shrunk"]:
    """A structural technique (pruning, low-rank, sparsity, ...) on a base, then a KD fine-tune."""
    return shrink_base(base, kd_teacher, dataset, technique, amount, get(technique).Options.model_validate(options), seed)
