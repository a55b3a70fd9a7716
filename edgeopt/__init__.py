"""edgeopt: compress a trained image model into the best model an edge device can run.

The domain core: plain Python over torch, ONNX, ONNX Runtime, OpenVINO, NNCF, torch-pruning
and MLflow. Nothing in this package imports ZenML; ``steps/`` adapts it to ZenML.
"""

__version__ = "0.1.0"
