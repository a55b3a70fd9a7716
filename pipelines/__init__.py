"""ZenML pipelines wiring the steps."""

from pipelines.compress import compress

__all__ = ["compress"]
