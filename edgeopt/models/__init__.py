"""Models: the architectures by name and their safe checkpoints (``zoo``); the model a user brings, as a
state dict or an ONNX file (``brought``), and its torch conversion (``onnx_graph``: the graph made
convertible; ``converted``: the torch side); any checkpoint exported to a format's FP32 file, checked for
parity (``export``).
"""
