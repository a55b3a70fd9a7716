"""ZenML pipelines wiring the steps."""

from edgeopt_zenml.pipelines.compress import compress

__all__ = ["compress"]
