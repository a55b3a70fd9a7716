"""edgeopt's ZenML side: thin steps over ``edgeopt`` (which never imports ZenML), the pipelines that
wire them, the materializers of edgeopt's artifact types, and the ``edgeopt`` command line.

In a ZenML project of your own: ``from edgeopt_zenml.steps import evaluate, quantize, ...``.
"""
