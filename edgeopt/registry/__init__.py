"""The MLflow model registry.

- :mod:`edgeopt.registry.versions`: model versions and aliases, and what a version's own run logged
  (its model files' sha256, its serving info);
- :mod:`edgeopt.registry.promote`: promotion of a run's winner (register, move the alias) under the lease;
- :mod:`edgeopt.registry.lease`: the promotion lease, and the models blocked by a rollback.
"""
