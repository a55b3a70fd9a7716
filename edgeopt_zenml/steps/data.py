from typing import Annotated

from zenml import step

from edgeopt.artifacts import Dataset
from edgeopt.config import DataConfig
from edgeopt.data.sources import load_dataset
from edgeopt_zenml.materializers import DatasetMaterializer


@step(enable_cache=False, output_materializers=DatasetMaterializer)
def load_data(data: dict, seed: int) -> Annotated[Dataset, "dataset"]:
    """Load and split the data. Always runs; an unchanged dataset has the same content hash,
    so the training steps downstream stay cached."""
    return load_dataset(DataConfig.model_validate(data), seed)
