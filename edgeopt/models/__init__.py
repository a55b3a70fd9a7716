"""Models: the architectures by name and their safe checkpoints (``zoo``), and the model a user brings, as a
state dict or an ONNX file, with its torch conversion (``brought``).
"""
