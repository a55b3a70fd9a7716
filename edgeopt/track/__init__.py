"""Tracking in MLflow: the pipeline's run, one nested run per variant, and who triggered it (``provenance``)."""
