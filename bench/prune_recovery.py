"""How much of a fully fine-tuned brought model's accuracy channel pruning keeps, and what KD buys back
(issue 19.8): the brought-model bench's EfficientNet-Lite1 (``brought_model.py --model lite1`` builds it),
converted to torch as the pipeline converts it (BatchNorm added and calibrated), pruned with one
importance, scored on the val split before any fine-tune, after BatchNorm recalibration on train images
and after the pipeline's least-squares refit of its 1x1 and Linear layers (edgeopt.shrink.reconstruct),
then KD fine-tuned from the brought model with each recipe given, from the refit model (from the plain
pruned one with ``--no-reconstruct``), with the pipeline's fine-tune for the config (the teacher section's
settings, the prune steps, lr and feature_kd; a recipe's ``fit``, ``kd`` and ``feature_kd`` keys over them),
printing each recipe's val
curve and its test accuracy.

    .venv/bin/python bench/prune_recovery.py --amount 0.2                                # ~3 min
    .venv/bin/python bench/prune_recovery.py --amount 0.3 --importance taylor --global-pruning \\
        --recipe '{"fit": {"steps": 300, "lr": 0.001}}' --recipe '{"fit": {"steps": 300, "lr": 0.0005}}'
    .venv/bin/python bench/prune_recovery.py --amount 0.5 --keep-residual --recipe '{"feature_kd": 0}' \
        --recipe '{"feature_kd": 1}'                                                     # ~10 min
    .venv/bin/python bench/prune_recovery.py --amount 0.2 --no-fine-tune --importance fpgm  # seconds

No goal: it tells which recovery recipe pays; the pipeline's goal is the brought-model bench's.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from _common import ROOT, argument_parser, fingerprint_line, load_line, quiet

CONFIG = ROOT / "configs" / "brought-lite1.yaml"
DEFAULT_RECIPE = "{}"  # the committed config's prune fine-tune


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--amount", type=float, default=0.2, help="share of each layer's channels pruned (default 0.2)")
    p.add_argument("--importance", default="l2", help="torch-pruning importance: l1, l2, taylor, bn_scale, fpgm, random")
    p.add_argument("--global-pruning", action="store_true", help="rank channels across layers")
    p.add_argument("--keep-residual", action="store_true",
                   help="prune only the channels one layer owns, not the residual streams (prune keep_residual: true)")
    p.add_argument("--recipe", action="append", help=f"a KD recipe as JSON ({{'fit': {{...}}, 'kd': {{...}}, 'feature_kd': w}}); "
                                                     f"repeatable; default {DEFAULT_RECIPE}: the config's own")
    p.add_argument("--no-fine-tune", action="store_true", help="only the accuracy right after pruning")
    p.add_argument("--no-reconstruct", action="store_true",
                   help="fine-tune the pruned model as pruned, not after the least-squares refit "
                        "the pipeline does (prune reconstruct: true)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    import torch

    from edgeopt.config import FitConfig, KDConfig
    from edgeopt.data.sources import load_dataset
    from edgeopt.measure.latency import cpu_fingerprint
    from edgeopt.models.brought import torch_from_onnx
    from edgeopt.models.zoo import add_batchnorm, calibrate_batchnorm, count_macs_params
    from edgeopt.plan import load_config
    from edgeopt.shrink.prune import RECONSTRUCTION_BATCHES, prune_channels, shuffled_train_batches
    from edgeopt.shrink.reconstruct import reconstruct
    from edgeopt.shrink.run import BN_CALIBRATION_BATCHES, calibration_batches, finetune_config
    from edgeopt.train.features import FeatureKD, shape_kept_layers
    from edgeopt.train.fit import fit, recalibrate_bn, split_accuracy

    print(fingerprint_line(cpu_fingerprint()))
    print(load_line("at the start"))
    cfg = load_config(CONFIG)
    assert cfg.teacher.onnx is not None
    if not Path(cfg.teacher.onnx).is_file():
        print(f"{cfg.teacher.onnx}: not built yet; run bench/brought_model.py --model lite1 first")
        return 2
    ds = load_dataset(cfg.data, cfg.seed)
    model = torch_from_onnx(Path(cfg.teacher.onnx), ds, "probabilities").model
    teacher = copy.deepcopy(model).eval()
    calibrate_batchnorm(model, add_batchnorm(model), calibration_batches(ds, BN_CALIBRATION_BATCHES))
    print(f"brought model val {split_accuracy(teacher, ds, 'val'):.4f}; its conversion with BatchNorm "
          f"{split_accuracy(model, ds, 'val'):.4f}")
    gradients = shuffled_train_batches(ds, cfg.seed) if args.importance == "taylor" else None
    prune = cfg.variants.shrink["prune"]
    reference = copy.deepcopy(model)
    macs = count_macs_params(model, ds.input_shape)[0]
    kept = prune_channels(model, ds.input_shape, len(ds.classes), args.amount, args.importance, round_to=prune.round_to,
                          global_pruning=args.global_pruning, gradient_batches=gradients,
                          keep_residual=args.keep_residual)
    recalibrated = copy.deepcopy(model)
    recalibrate_bn(recalibrated, ds.batches("train", 32, shuffle=True, seed=cfg.seed, limit=320))
    pruned_acc = split_accuracy(model, ds, "val")
    plain = copy.deepcopy(model)
    start = time.perf_counter()
    refit = reconstruct(model, reference, kept, torch.cat([x for x, _ in shuffled_train_batches(ds, cfg.seed, RECONSTRUCTION_BATCHES)]),
                        seed=cfg.seed)
    print(f"pruned {args.amount:.0%} ({args.importance}{', global' if args.global_pruning else ''}"
          f"{', residual streams kept' if args.keep_residual else ''}; MACs {macs / 1e6:.0f}M -> "
          f"{count_macs_params(model, ds.input_shape)[0] / 1e6:.0f}M): val "
          f"{pruned_acc:.4f}, after BatchNorm recalibration {split_accuracy(recalibrated, ds, 'val'):.4f}, after the "
          f"least-squares refit {split_accuracy(model, ds, 'val'):.4f} ({refit['layers']} layers, output error "
          f"{refit['error_before']:.3f} -> {refit['error_after']:.3f}, {time.perf_counter() - start:.0f} s)")
    if args.no_reconstruct:
        model = plain
    if args.no_fine_tune:
        return 0
    # the pipeline's fine-tune settings (the teacher section's, the config's prune steps and lr), a recipe over them
    train = cfg.teacher.model_dump(mode="json")
    own = finetune_config(train, prune).model_dump()
    for text in args.recipe or [DEFAULT_RECIPE]:
        recipe = json.loads(text)
        student = copy.deepcopy(model)
        weight = recipe.get("feature_kd", prune.feature_kd)
        features = FeatureKD(teacher, shape_kept_layers(student, teacher, ds.input_shape), weight) if weight else None
        start = time.perf_counter()
        hist = fit(student, ds, FitConfig.model_validate({**own, **recipe.get("fit", {})}), teacher=teacher,
                   kd=KDConfig.model_validate({**(train.get("kd") or {}), **recipe.get("kd", {})}),
                   teacher_output="probabilities", seed=cfg.seed, features=features)
        print(f"{text}: val curve {[round(v, 3) for v in hist['val_acc']]} at steps {hist['step']}, best "
              f"{hist['best_val_acc']:.4f}; test {split_accuracy(student, ds, 'test'):.4f}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
