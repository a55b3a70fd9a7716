"""edgeopt: compress a trained image model into the best model an edge device can run.

    import edgeopt
    result = edgeopt.optimize("model.onnx", "imgs/", output="out/")   # the winner's files, report, config

The domain core: plain Python over torch, ONNX, ONNX Runtime, OpenVINO, NNCF, torch-pruning
and MLflow. Nothing in this package imports ZenML; ``edgeopt_zenml`` adapts it to ZenML. ``optimize``
runs the ZenML pipeline, so it lives there (:func:`edgeopt_zenml.api.optimize`) and is imported from
here only when it is first used: ``import edgeopt`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "optimize"]


def __getattr__(name: str) -> Any:
    if name in ("optimize", "OptimizeResult"):
        from edgeopt.env import configure_local_state

        configure_local_state()  # before ZenML is imported: the user's ZenML, else the embedded store
        import importlib

        return getattr(importlib.import_module("edgeopt_zenml.api"), name)
    raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
