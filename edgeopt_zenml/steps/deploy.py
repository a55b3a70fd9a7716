from pathlib import Path
from typing import Annotated, Optional

from zenml import step

from edgeopt.deploy.champion import deploy_from_registry
from edgeopt.registry.promote import PromotionResult


@step(enable_cache=False)
def deploy(promotion: PromotionResult, tracking_uri: str, registered_model: str, alias: str,
           root: str, keep: int) -> Annotated[Optional[str], "bundle"]:
    """Make the deploy folder serve the champion (atomically); returns the current bundle's path.

    Runs after ``promote`` whether or not it promoted: it deploys whatever the registry alias
    points to, with the labels and preprocessing logged with that version's own run, so concurrent
    runs converge on one champion and one current bundle, and a run that finds the folder behind
    the alias (a crash, a rollback cut short) repairs it."""
    bundle = deploy_from_registry(uri=tracking_uri, name=registered_model, alias=alias, root=Path(root), keep=keep)
    return str(bundle.path) if bundle else None
