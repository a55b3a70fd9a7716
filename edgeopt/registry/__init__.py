"""The MLflow model registry beyond versions and aliases: the promotion lease and the blocked versions (``lease``)."""
