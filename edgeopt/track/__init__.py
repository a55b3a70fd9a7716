"""Tracking in MLflow.

- :mod:`edgeopt.track.runs`: the pipeline's run, one nested run per variant (with its LoggedModel
  and serving info), and the measurements of each target device;
- :mod:`edgeopt.track.uri`: the tracking store behind a URI (client, experiment, the URI without
  its secrets);
- :mod:`edgeopt.track.provenance`: who and what triggered a run.
"""
