"""The ZenML side of a rollback: the model stage follows the registry alias back."""

from __future__ import annotations

from typing import Optional

from zenml.client import Client
from zenml.enums import ModelStages


def restore_stage(name: str, version: str, run_id: str) -> Optional[str]:
    """Put the ZenML model version whose run promoted MLflow ``version`` (from ``run_id``) back in
    stage production (the version in it now is archived); its name, or None when no ZenML model
    version promoted it (e.g. it was promoted from another ZenML server)."""
    client = Client()
    try:
        model = client.get_model(name)
    except KeyError:
        return None
    page = 1
    while True:
        found = client.list_model_versions(model=model.id, sort_by="desc:number", page=page, size=50, hydrate=True)
        for mv in found.items:
            rec = mv.run_metadata.get("promotion")
            if isinstance(rec, dict) and rec.get("promoted") and str(rec.get("version")) == version \
                    and rec.get("run_id") == run_id:
                mv.set_stage(ModelStages.PRODUCTION, force=True)
                return mv.name
        if page >= found.total_pages:
            return None
        page += 1
