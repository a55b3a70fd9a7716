"""The cheap stage and the short fine-tunes of a trial, with the project's own functions.

- :meth:`Prober.probe`: the technique applied to the base with no fine-tune (``shrink_base`` with zero
  fine-tune steps and no refit: the same conversion, technique and shapes as a grid variant), exported to every format
  and quantized to every precision of the run (calibrated on a few images: latency and size do not
  depend on the weights), then timed with the run's latency protocol (``edgeopt.measure.latency.measure``)
  in ONE loop with the unpruned base's same models, so that every speed is a same-run ratio. Seconds,
  not a fine-tune.
- :meth:`Prober.finetune`: the same ``shrink_base`` with ONE short KD fine-tune that runs through the
  successive-halving rungs (Hyperband with continuation): its warm-up and cosine are sized for the
  longest rung, it is evaluated at each rung's step, and the caller stops it at the rung where successive
  halving drops the trial. A promoted candidate continues where its last rung stopped instead of starting
  over; one that reaches the last rung got the schedule a grid variant of that length gets.

Survivors get the technique's full fine-tune in the pipeline (``edgeopt.search.outcome.build_survivor``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import ExitStack
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact, workdir_scope
from edgeopt.config import RunConfig
from edgeopt.measure.evaluate import latency_input
from edgeopt.measure.latency import Measured, measure
from edgeopt.plan.variants import ShrinkSpec, variant_plan
from edgeopt.search.space import Candidate, Combo, Probe

log = logging.getLogger(__name__)

# (format, precision, runtimes) of a base, in the plan's order
Build = Tuple[str, str, Tuple[str, ...]]


def combo_name(precision: str, fmt: str, runtime: str) -> str:
    return f"{precision}-{fmt}@{runtime}"


def full_steps(base: Checkpoint, dataset: Dataset, opts) -> int:
    """The optimizer steps of a technique's full KD fine-tune on ``base`` (what a grid variant gets)."""
    from edgeopt.shrink.run import finetune_config

    fc = finetune_config(base.manifest.get("train_config") or {}, opts)
    return fc.steps or fc.epochs * math.ceil(dataset.size("train") / fc.batch_size)


def rung_steps(full: int, short: float, rungs: int, reduction_factor: int) -> List[int]:
    """The steps at which the successive-halving rungs end (one fine-tune runs through them): each
    ``reduction_factor`` times the last, the last ``short`` of the full fine-tune (at least one step each,
    never longer than the full one)."""
    first = max(1, round(short * full / reduction_factor ** (rungs - 1)))
    return sorted({min(full, first * reduction_factor ** k) for k in range(rungs)})


class Prober:
    """Builds and measures candidates of one run on this machine (each worker has its own)."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, bases: Dict[str, Checkpoint], kd_teacher: Checkpoint,
                 seed: int):
        assert cfg.variants.search is not None
        self.cfg, self.search, self.dataset, self.bases = cfg, cfg.variants.search, dataset, bases
        self.kd_teacher, self.seed = kd_teacher, seed
        plan = variant_plan(cfg)
        self.builds: Dict[str, List[Build]] = {
            base: [(b.format, b.precision, b.runtimes) for b in plan.builds if b.shrink == ShrinkSpec(base)]
            for base in cfg.variants.bases}
        self.quant = cfg.variants.quant.model_copy(update={"calibration_samples": self.search.calibration_samples})
        self.finetunes: List[int] = []  # the steps of every fine-tune this prober ran
        self._base_models: Dict[str, Dict[str, Tuple[str, ModelArtifact]]] = {}
        self._scope = ExitStack()

    def __enter__(self) -> "Prober":
        self._scope.enter_context(workdir_scope())  # the base's models live as long as the prober
        return self

    def __exit__(self, *exc) -> None:
        self._scope.close()

    @cached_property
    def reference_accuracy(self) -> float:
        """The reference's val accuracy (the teacher, in torch or through ONNX Runtime for a brought file),
        what every drop during the search is against."""
        from edgeopt.models.zoo import load_checkpoint
        from edgeopt.train.fit import split_accuracy

        return split_accuracy(load_checkpoint(self.bases.get("teacher", self.kd_teacher)), self.dataset, "val")

    def shrunk(self, cand: Candidate, steps: int = 0, **fit_hooks: Any) -> Checkpoint:
        """The candidate built by ``shrink_base``: its structure alone (``steps`` 0: no fine-tune and no
        least-squares refit, which change weights, never shapes), or, once probed, a KD fine-tune of
        ``steps`` (``fit_hooks``: ``eval_at`` and ``on_eval``, for its ``fit``)."""
        from edgeopt.shrink.run import shrink_base

        opts = self.cand_options(cand)
        update: Dict[str, Any] = {"finetune_epochs": 0, "finetune_steps": steps or None}
        if not steps and "reconstruct" in type(opts).model_fields:
            update["reconstruct"] = False
        return shrink_base(self.bases[cand.base], self.kd_teacher, self.dataset, cand.technique, cand.amount,
                           opts.model_copy(update=update), self.seed, export_checked=bool(steps), **fit_hooks)

    def cand_options(self, cand: Candidate):
        return cand.options(self.search.shrink)

    def _build(self, ckpt: Checkpoint, base: str, label: str) -> Tuple[Dict[str, Tuple[str, ModelArtifact]],
                                                                          Dict[str, str]]:
        """Every combination of ``base``'s builds for ``ckpt``: (runtime, model), and why any did not build."""
        from edgeopt.models.export import export_checkpoint
        from edgeopt.precisions import quantize_model

        models, failed, exports = {}, {}, {}
        for fmt, precision, runtimes in self.builds[base]:
            if fmt not in exports:
                exports[fmt] = export_checkpoint(ckpt, fmt, self.dataset, f"{label}-fp32-{fmt}")
            m = exports[fmt] if precision == "fp32" else quantize_model(
                exports[fmt], precision, self.dataset, self.quant, self.seed, f"{label}-{precision}-{fmt}")
            for rt in runtimes:
                key = combo_name(precision, fmt, rt)
                if m.failed:
                    failed[key] = str(m.manifest.get("reason"))[:300]
                else:
                    models[key] = (rt, m)
        return models, failed

    def base_models(self, base: str) -> Dict[str, Tuple[str, ModelArtifact]]:
        if base not in self._base_models:
            models, failed = self._build(self.bases[base], base, f"{base}-search-anchor")
            if failed:
                raise RuntimeError(f"the unpruned {base} does not build for the search: {failed}")
            self._base_models[base] = models
        return self._base_models[base]

    def _measure(self, models: Dict[str, Tuple[str, ModelArtifact]]) -> Dict[str, Measured]:
        """Latency of every model in one interleaved loop (the run's protocol: threads, batch, warm-up,
        iterations); no accuracy pass and no INT8 census, which the survivors get in evaluate."""
        from edgeopt.runtimes import make_predictor

        t = self.cfg.target
        out: Dict[str, Measured] = {}
        timed: Dict[str, Callable[[np.ndarray], Any]] = {}
        for k, (rt, m) in models.items():
            try:
                p = make_predictor(rt, m.model_file, t.threads)
            except Exception as err:  # noqa: BLE001 - a model its runtime refuses is recorded, the others go on
                out[k] = Measured(error=f"{type(err).__name__}: {err}".splitlines()[0][:300])
                continue
            timed[k] = p if p.fixed_batch in (None, t.batch) else p.predict_batched
        latencies = measure(timed, latency_input(self.dataset, t.batch), warmup=t.warmup, iterations=t.iterations,
                            time_budget_s=t.time_budget_s)
        return {**out, **{k: Measured(latency=lat) for k, lat in latencies.items()}}

    def base_combos(self, base: str) -> Dict[str, Combo]:
        """The unpruned base alone: whether a target binds."""
        measured = self._measure(self.base_models(base))
        out = {}
        for k, (_, model) in self.base_models(base).items():
            if (lat := measured[k].latency) is not None:
                out[k] = Combo(lat.p50_ms, model.model_bytes / 1e6, lat.noise_pct, lat.p50_ms)
        return out

    def probe(self, cand: Candidate) -> Probe:
        """The cheap stage: build with no fine-tune, every combination, one loop with the unpruned base."""
        base_models = self.base_models(cand.base)
        with workdir_scope():
            ckpt = self.shrunk(cand)
            if not ckpt.manifest.get("learned", True):
                raise RuntimeError(str(ckpt.manifest.get("reason")))
            models, failed = self._build(ckpt, cand.base, f"search-{cand.base}")
            measured = self._measure({**{f"cand:{k}": v for k, v in models.items()},
                                      **{f"base:{k}": v for k, v in base_models.items()}})
            combos = {}
            for k, (_, m) in models.items():
                got, ref = measured[f"cand:{k}"].latency, measured[f"base:{k}"].latency
                if got is None or ref is None:
                    failed[k] = str(measured[f"cand:{k}"].error or measured[f"base:{k}"].error)
                    continue
                combos[k] = Combo(got.p50_ms, m.model_bytes / 1e6, max(got.noise_pct, ref.noise_pct), ref.p50_ms)
            first = next(iter(base_models))  # the base's first combination (fp32 where the run has it)
            ref_lat = measured[f"base:{first}"].latency
            return Probe(params=int(ckpt.manifest["params"]), macs=int(ckpt.manifest["macs"]), combos=combos,
                         base_ref_p50_ms=ref_lat.p50_ms if ref_lat else math.nan,
                         base_size_mb=base_models[first][1].model_bytes / 1e6, signature=self._signature(ckpt),
                         failed=failed)

    def anchor(self, base: str, probe: Probe) -> Probe:
        """The unpruned base as a probe, from the latencies measured in ``probe``'s own loop."""
        models, m = self.base_models(base), self.bases[base].manifest
        combos = {k: Combo(c.base_p50_ms, models[k][1].model_bytes / 1e6, c.noise_pct, c.base_p50_ms)
                  for k, c in probe.combos.items()}
        return Probe(params=int(m["params"]), macs=int(m["macs"]), combos=combos,
                     base_ref_p50_ms=probe.base_ref_p50_ms, base_size_mb=probe.base_size_mb)

    @staticmethod
    def _signature(ckpt: Checkpoint) -> str:
        """The shapes of every tensor of the built model (weights.pt), hashed."""
        import torch

        state = torch.load(ckpt.path / "weights.pt", map_location="cpu", weights_only=True)
        shapes = sorted((k, tuple(v.shape)) for k, v in state.items())
        return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]

    def finetune(self, cand: Candidate, rungs: List[int],
                 on_rung: Callable[[int, float], bool]) -> Tuple[int, Optional[float], str]:
        """One KD fine-tune of a fresh build through the rungs (``rungs``: their steps, ascending):
        ``on_rung(k, acc)`` after rung ``k``'s evaluation, with the best val accuracy so far (the weights the
        fine-tune keeps if it stops there); True stops the fine-tune at that rung. The schedule is sized
        for ``rungs[-1]`` either way. Returns (optimizer steps run, best val accuracy or None, why none)."""
        index = {s: k for k, s in enumerate(rungs)}
        seen = {"steps": 0, "best": -1.0}

        def on_eval(step: int, acc: float) -> bool:
            seen["steps"], seen["best"] = step, max(seen["best"], acc)
            return step in index and on_rung(index[step], seen["best"])

        with workdir_scope():
            m = self.shrunk(cand, rungs[-1], eval_at=rungs, on_eval=on_eval).manifest
        ran = int(seen["steps"])
        if ran:
            self.finetunes.append(ran)
        if not m.get("learned", True) or m.get("val_accuracy") is None:
            return ran, None, str(m.get("reason") or "the fine-tune did not run")
        return ran, float(m["val_accuracy"]), ""
