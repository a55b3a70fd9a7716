"""edgeopt's front door in Python: your model and your images in, the best model this CPU can run out.

    import edgeopt
    result = edgeopt.optimize("model.onnx", "imgs/", output="out/")
    result.winner, result.rows, result.files["model"]

The same as ``edgeopt optimize model.onnx --data imgs/ --output out/``: it builds a whole run config from
the arguments (the model brought as the teacher, the folder as an ImageFolder, the teacher as the only
base unless you ask for more), validates it like a config file, checks every input and the brought model
on validation images (:mod:`edgeopt.plan.reference`: its normalization, its class order, above chance),
runs the compress pipeline on the active ZenML stack, and writes into ``output``: the winner's model
file(s), ``report.md`` and ``report.json`` (the table, the selection and what was decided before the run)
and ``config.yaml``, the full config it used: ``edgeopt run -c out/config.yaml`` is the next run.

By default nothing is promoted or deployed (``deploy.enabled: false``); ``deploy=True`` (``--deploy``)
adds the registry alias and the deploy folder of a config run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from edgeopt.agent import TOKEN_ENV
from edgeopt.config import ConfigError, RunConfig, resolve_path
from edgeopt.config.load import apply_overrides
from edgeopt.plan import parse_config
from edgeopt.plan.reference import Prepared, prepare_reference

PathLike = Union[str, Path]
Numbers = Union[str, Sequence[float], None]


@dataclass
class OptimizeResult:
    """What :func:`optimize` produced: the winner, one row per measured variant, the files written."""

    winner: Optional[str]
    rows: List[Dict[str, Any]]
    files: Dict[str, Path]  # model (the main file), model_files, report.md, report.json, config.yaml, pareto.png
    headline: str
    table: str
    notes: List[str] = field(default_factory=list)  # what was decided before the run (normalization, labels ...)
    warnings: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)  # the full config used
    report: Dict[str, Any] = field(default_factory=dict)  # report.json's content

    def to_json(self) -> Dict[str, Any]:
        return {**self.report, "files": {k: _paths_json(v) for k, v in self.files.items()}}


def _paths_json(v: Any) -> Any:
    return [str(p) for p in v] if isinstance(v, list) else str(v)


def _name(model: Path) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", model.stem).strip("-._") or "model")[:60]


def _numbers(v: Numbers) -> Union[str, List[float], None]:
    """A normalization as the CLI gives it: a name (imagenet, zero-one ...) or numbers ("0.5,0.5,0.5")."""
    if v is None or not isinstance(v, str):
        return None if v is None else [float(x) for x in v]
    try:
        return [float(x) for x in v.replace(",", " ").split()]
    except ValueError:
        return v.strip()


def _model_input(model: Path) -> Tuple[Optional[int], Optional[Tuple[int, int]]]:
    """(channels, (height, width)) an ONNX file's input fixes, as far as it does; (None, None) if unreadable
    (the pre-flight then says why)."""
    try:
        import onnx

        m = onnx.load(str(model), load_external_data=False)
        init = {i.name for i in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in init)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    except Exception:  # noqa: BLE001 - not an ONNX file we can read: the pre-flight refuses it in one line
        return None, None
    if len(dims) != 4:
        return None, None
    size = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return dims[1], size


def build_config(model: PathLike, data: PathLike, *, target: str = "cpu", formats: Optional[Sequence[str]] = None,
                 precisions: Optional[Sequence[str]] = None, max_drop: Optional[float] = 1.0, mean: Numbers = None,
                 std: Numbers = None, labels: Optional[PathLike] = None, image_size: Optional[Tuple[int, int]] = None,
                 resize: Optional[str] = None, arch: Optional[str] = None, name: Optional[str] = None,
                 deploy: bool = False, force: bool = False) -> Dict[str, Any]:
    """The whole run config for a brought model (``.onnx``, or a state dict ``.pt/.pth/.safetensors`` for
    ``arch``) and an ImageFolder ``data``: the model is the teacher and the only base; its input size and
    channels come from the file where it fixes them; ``mean`` defaults to ``auto`` (the model's metadata, else
    the normalization it scores best with on validation images). Paths are made absolute."""
    model, data = Path(model).expanduser().absolute(), Path(data).expanduser().absolute()
    name = name or _name(model)
    onnx_file = model.suffix.lower() == ".onnx"
    channels, size = _model_input(model) if onnx_file else (None, None)
    teacher: Dict[str, Any] = {"onnx": str(model)} if onnx_file else {"checkpoint": str(model), "arch": arch}
    if arch and onnx_file:
        teacher["arch"] = arch
    mean_v, std_v = _numbers(mean), _numbers(std)
    data_section: Dict[str, Any] = {"source": "imagefolder", "root": str(data), "grayscale": channels == 1,
                                    "mean": "auto" if mean_v is None and std_v is None else mean_v}
    if std_v is not None:
        data_section["std"] = std_v
    if image_size or size:
        data_section["image_size"] = list(image_size or size or ())
    if labels is not None:
        data_section["labels"] = str(Path(labels).expanduser().absolute())
    if resize:
        data_section["resize"] = resize
    variants: Dict[str, Any] = {"bases": ["teacher"]}
    if formats:
        variants["formats"] = list(formats)
    if precisions:
        variants["quantization"] = list(precisions)
    raw: Dict[str, Any] = {
        "name": name, "data": data_section, "teacher": teacher, "variants": variants,
        "target": {"constraints": {"max_accuracy_drop": max_drop}},
        "registry": {"name": f"edgeopt-{name}"},
        "deploy": {"enabled": bool(deploy), "root": str(Path.cwd() / "deploy" / name)},
        "checks": {"near_chance": "warn" if force else "refuse"},
    }
    if target != "cpu":
        label, eq, url = target.partition("=")
        if not eq:
            raise ValueError(f"--target {target!r}: expected cpu (this machine) or LABEL=URL (a device's agent, its "
                             f"token in ${TOKEN_ENV})")
        raw["targets"] = [{"label": label, "url": url, "token_env": TOKEN_ENV}]
    return raw


def optimize_config(model: PathLike, data: PathLike, overrides: Sequence[str] = (), **options: Any) -> RunConfig:
    """:func:`build_config` (``options``: its keywords) with ``key.path=value`` overrides, validated like a config
    file (edgeopt.plan); ConfigError or ValueError (a malformed option) in one line."""
    return parse_config(apply_overrides(build_config(model, data, **options), overrides), "optimize")


def check_tracking_env(cfg: RunConfig) -> None:
    """``MLFLOW_TRACKING_URI``, when it is what the config falls back on, must be a store MLflow 3 takes."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.uri or not uri:
        return
    from pydantic import ValidationError

    from edgeopt.config import TrackingConfig

    try:
        TrackingConfig(uri=uri)
    except ValidationError as err:
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def prepare_run(cfg: RunConfig) -> Tuple[Prepared, List[str]]:
    """Everything checked before any step starts, each problem one line: the inputs' pre-flight (data, brought
    model, tracking store, deploy folder), the target devices' agents, the brought model on validation images.
    Returns the prepared config and one line per target device reached."""
    from edgeopt.plan.preflight import check_run_inputs

    check_tracking_env(cfg)
    check_run_inputs(cfg)
    lines = []
    if cfg.targets:
        from edgeopt.agent.targets import preflight_targets

        for d, info in zip(cfg.targets, preflight_targets(cfg.targets)):
            fp = info["fingerprint"]
            lines.append(f"target {d.label}: {fp['cpu']} ({fp['cores']} cores), runtimes {', '.join(info['runtimes'])}, "
                         f"fingerprint {fp['id']}")
    return prepare_reference(cfg), lines


def _finite(v: Any) -> Any:
    """JSON without NaN/Infinity (strict parsers refuse them): those become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def summary_json(summary: Dict[str, Any], prepared: Optional[Prepared] = None) -> Dict[str, Any]:
    """A run's outcome as JSON: the winner, every variant's row (verdict, metrics), the reference, the
    selection, the promotion (None in export-only runs), what was decided before the run."""
    ev, sel = summary["evaluation"], summary["selection"]
    rows = []
    for v in sel.verdicts:
        r = ev.result(v.variant)
        rows.append({"variant": v.variant, "status": v.status, "reasons": v.reasons, "winner": v.variant == sel.winner,
                     "reference": v.variant == ev.reference.variant, "failure": r.reason, "metrics": r.metrics,
                     "recipe": r.recipe, "runtime_settings": r.runtime_settings})
    promotion = summary.get("promotion")
    return _finite({
        "run": summary["run"].name, "winner": sel.winner, "headline": summary["headline"], "rows": rows,
        "reference": ev.reference.model_dump(mode="json"), "fingerprint": ev.fingerprint,
        "selection": sel.model_dump(mode="json", exclude={"verdicts"}),
        "promotion": promotion.model_dump(mode="json") if promotion is not None else None,
        "bundle": summary.get("bundle"), "tracking_uri": summary.get("tracking_uri"),
        "notes": [*(prepared.notes if prepared else []), *summary.get("notes", [])],
        "warnings": prepared.warnings if prepared else [],
        "reference_check": {"accuracy": prepared.accuracy, "normalization": prepared.normalization,
                            "scores": prepared.scores} if prepared and prepared.scores else None,
    })


def config_text(cfg: RunConfig) -> str:
    """The full config as YAML, its paths absolute (it runs from any folder)."""
    absolute = cfg.map_paths(lambda p: None if p is None else resolve_path(p))
    return yaml.safe_dump(absolute.model_dump(mode="json"), sort_keys=False)


def _dataset_manifest(run) -> Dict[str, Any]:
    """The manifest of the run's dataset artifact, read from the artifact store (not the images)."""
    from zenml.io import fileio

    with fileio.open(os.path.join(str(run.steps["load_data"].outputs["dataset"][0].uri), "manifest.json"), "r") as f:
        return json.loads(f.read())


def write_output(out: Path, summary: Dict[str, Any], cfg: RunConfig,
                 prepared: Prepared) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Write the winner's model file(s), report.md, report.json, pareto.png and config.yaml into ``out``;
    returns report.json's content and the files written."""
    from edgeopt_zenml.pipelines.runner import output, winner_model

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model.*"):  # a former run's files (another format) must not pass for this winner's
        old.unlink()
    files: Dict[str, Any] = {}
    report = summary_json(summary, prepared)
    winner = summary["selection"].winner
    if winner:
        model = winner_model(summary["run"], cfg, winner)
        names = sorted((n for n in model.manifest["files"] if n.startswith("model.")),
                       key=lambda n: (n != model.model_file.name, n))
        files["model_files"] = [Path(shutil.copy2(model.path / n, out / n)) for n in names]
        files["model"] = out / model.model_file.name
        ds = _dataset_manifest(summary["run"])
        report["serving"] = _finite({
            "model": model.model_file.name, "format": model.format, "runtime": winner.split("@", 1)[1],
            "runtime_settings": summary["evaluation"].result(winner).runtime_settings, "labels": ds["classes"],
            "output": model.manifest.get("output", "logits"),
            "preprocessing": {k: ds[k] for k in ("input_shape", "mean", "std", "scale")}
            | {"resize": ds.get("resize", {"mode": "stretch"})},
        })
    (out / "config.yaml").write_text("# the full config of this run: edgeopt run -c config.yaml runs it again\n"
                                     + config_text(cfg))
    files["config.yaml"] = out / "config.yaml"
    shutil.copyfile(output(summary["run"], "select", "pareto_plot").png, out / "pareto.png")
    files["pareto.png"] = out / "pareto.png"
    decided = [f"- {n}" for n in report["notes"]] + [f"- **warning:** {w}" for w in report["warnings"]]
    md = [f"# edgeopt: {cfg.name}", "", "```", summary["headline"], "```", ""]
    if decided:
        md += ["## Decided before the run", "", *decided, ""]
    selection_md = str(output(summary["run"], "select", "selection_report"))
    if not cfg.deploy.enabled:  # the select step states what the promotion rule says; nothing applies it here
        selection_md = selection_md.replace("**Promotion:** ", "**Promotion (not applied: export only):** ", 1)
    md += [f"**Files:** {', '.join(p.name for p in files.get('model_files', [])) or 'none (no winner)'}; "
           "config.yaml (the full config used); report.json.", "", selection_md]
    (out / "report.md").write_text("\n".join(md))
    files["report.md"] = out / "report.md"
    files["report.json"] = out / "report.json"
    report["files"] = {k: _paths_json(v) for k, v in files.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report, files


def optimize(model: PathLike, data: PathLike, *, target: str = "cpu", formats: Optional[Sequence[str]] = None,
             precisions: Optional[Sequence[str]] = None, max_drop: Optional[float] = 1.0,
             output: Optional[PathLike] = None, mean: Numbers = None, std: Numbers = None,
             labels: Optional[PathLike] = None, image_size: Optional[Tuple[int, int]] = None,
             resize: Optional[str] = None, arch: Optional[str] = None, name: Optional[str] = None,
             deploy: bool = False, force: bool = False, overrides: Sequence[str] = (), enable_cache: bool = True,
             run_name: Optional[str] = None) -> OptimizeResult:
    """Make ``model`` (an ONNX file, or a state dict for ``arch``) the best model this CPU (or ``target``, a
    device's agent as ``LABEL=URL``) runs on ``data`` (an ImageFolder), within ``max_drop`` points of its
    validation accuracy, and write it with its report and config into ``output`` (default
    ``<model name>-optimized``). ``overrides``: ``key.path=value`` settings on the config it builds (the
    CLI's ``--set``). Raises ConfigError, the pre-flight's errors, ReferenceError (the model scores near
    chance; ``force`` goes on) or RunFailed, each one line."""
    cfg = optimize_config(model, data, overrides, target=target, formats=formats, precisions=precisions,
                          max_drop=max_drop, mean=mean, std=std, labels=labels, image_size=image_size, resize=resize,
                          arch=arch, name=name, deploy=deploy, force=force)
    prepared, _ = prepare_run(cfg)
    from edgeopt_zenml.pipelines.runner import run_pipeline

    summary = run_pipeline(prepared.config, enable_cache=enable_cache, run_name=run_name)
    out = Path(output).expanduser().absolute() if output else Path.cwd() / f"{cfg.name}-optimized"
    report, files = write_output(out, summary, prepared.config, prepared)
    return OptimizeResult(winner=report["winner"], rows=report["rows"], files=files, headline=summary["headline"],
                          table=summary["table"], notes=report["notes"], warnings=report["warnings"],
                          config=prepared.config.model_dump(mode="json"), report=report)
