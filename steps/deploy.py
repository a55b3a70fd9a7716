from pathlib import Path
from typing import Annotated, Optional

from zenml import step

from edgeopt.artifacts import Dataset
from edgeopt.deploy import deploy_from_registry


@step(enable_cache=False)
def deploy(promotion: dict, dataset: Dataset, tracking_uri: str, registered_model: str, alias: str,
           root: str, keep: int) -> Annotated[Optional[str], "bundle"]:
    """Write the champion's bundle to the deploy folder atomically; returns its path."""
    if not promotion["promoted"]:
        return None
    bundle = deploy_from_registry(uri=tracking_uri, name=registered_model, alias=alias, root=Path(root),
                                  dataset_manifest=dataset.manifest, promotion=promotion, keep=keep)
    return str(bundle.path)
