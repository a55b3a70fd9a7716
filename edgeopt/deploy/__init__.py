"""Deployment: bundles in a deploy folder, switched atomically, with a history to roll back along.

- :mod:`edgeopt.deploy.bundle`: one bundle (model files, runtime.json, labels.json, manifest), its
  identity and checks (intact, loads and answers);
- :mod:`edgeopt.deploy.folder`: the deploy folder (``versions/``, the ``current`` link, the history,
  its lock): writing a bundle and switching to it (:func:`~edgeopt.deploy.folder.deploy`);
- :mod:`edgeopt.deploy.champion`: the folder kept in step with the registry's alias
  (:func:`~edgeopt.deploy.champion.deploy_from_registry`, :func:`~edgeopt.deploy.champion.rollback`).
"""
