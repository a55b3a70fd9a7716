"""Precision recipes: what turns an exported FP32 model file into its FP16, bf16 or INT8 variant.

Each recipe is one module with a :class:`Precision` subclass: its name, its options schema (a
pydantic model of light imports, composed into the run config's ``variants.quant``), its
implementations by format name, and its recipe (every option it uses, resolved, and a method
a person can read). Defining the subclass registers it, so a new recipe is one new module;
``fp32`` is no recipe: it is the export itself.

The formats a recipe applies to are the keys of its ``implementations`` (``formats_for(name)``; ``names()``
lists every precision, ``REGISTRY`` holds the recipes); what each one does on each format is told in
docs/precisions-and-formats.md.

bf16, fp16-native and int8-bf16 carry their precision in the IR (``native.py``); ``validate`` refuses
them on a CPU without the flags they name (``Precision.cpu_flags``).
int8-qat fine-tunes the torch conversion of the FP32 ONNX file (for IR: the ``source.onnx`` kept beside it).

The modules import onnx, ONNX Runtime, OpenVINO and NNCF inside their functions only, so the
config validates ``variants.quant`` without them. Usable from a notebook, on artifacts or on files::

    int8 = quantize_model(fp32_artifact, "int8", dataset, QuantConfig(), seed=0, variant="mine-int8-onnx")
    ort.quantize_static_qdq(Path("model.onnx"), Path("model.int8.onnx"), images)      # N x C x H x W float32
    nncf_backend.quantize(Path("model.xml"), Path("int8/model.xml"), "openvino", images)
    int8_coverage("onnxruntime", Path("model.int8.onnx"))  # {'int8_ops': 20, 'float_ops': 0, ...}
"""

# The built-in recipes register themselves on import.
from edgeopt.precisions import fp16, int8, int8_acc, int8_dynamic, native, qat  # noqa: E402,F401,I001
from edgeopt.precisions.base import (  # noqa: F401  (the package's interface)
    IDENTITY,
    NATIVE,
    REGISTRY,
    Inputs,
    Precision,
    formats_for,
    get,
    names,
    natives,
    quantize_model,
)
