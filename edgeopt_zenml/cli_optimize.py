"""``edgeopt optimize MODEL --data DIR``: the one-command front door (edgeopt_zenml.api.optimize)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import click

from edgeopt_zenml.cli_common import EXIT_GATE, Out, exit_now, json_option, prepare, run_reported, set_option


def _csv(_ctx, _param, value: Tuple[str, ...]) -> Optional[list]:
    """--formats onnx,openvino (or the option repeated) -> [onnx, openvino]; None when not given."""
    items = [x.strip() for v in value for x in v.split(",") if x.strip()]
    return items or None


def _size(_ctx, _param, value: Optional[str]) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not (h.strip().isdigit() and (not sep or w.strip().isdigit())):
        raise click.BadParameter("expected HEIGHTxWIDTH (224x224) or one side (224)")
    return int(h), int(w if sep else h)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", type=click.Path(path_type=Path), required=True,
              help="Your images: an ImageFolder, DIR/<class>/*.jpg (or pre-split DIR/train|val|test/<class>/).")
@click.option("--target", default="cpu", show_default=True,
              help="Where the variants are measured: cpu (this machine) or LABEL=URL (an edgeopt agent on the device, "
                   "its token in $EDGEOPT_AGENT_TOKEN).")
@click.option("--formats", multiple=True, callback=_csv, metavar="LIST",
              help="Export formats, e.g. onnx,openvino (default: the config default, onnx and openvino).")
@click.option("--precisions", multiple=True, callback=_csv, metavar="LIST",
              help="Precisions, e.g. fp32,int8,bf16 (default: fp32,int8); native: the CPU's own (bf16, int8-bf16, "
                   "fp16-native) where it has them, none where it has not.")
@click.option("--max-drop", type=click.FloatRange(0, 100), default=1.0, show_default=True,
              help="Largest validation-accuracy drop allowed against your model, in points.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the optimized model, report.md, report.json and config.yaml go "
                   "(default: ./<model name>-optimized).")
@click.option("--mean", default=None, metavar="NAME|LIST",
              help="How your model normalizes its input: imagenet, zero-one ([0,1]), minus-one-one ([-1,1]), train "
                   "(the train split's statistics), auto, or numbers (0.5,0.5,0.5). Default: auto: the model's "
                   "metadata, else the one it scores best with on validation images (reported).")
@click.option("--std", default=None, metavar="LIST", help="The std that goes with numbers in --mean.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Class index -> folder name (labels.txt, one name per line; or labels.json). Default: the "
                   "model's metadata when it names the folders, else the folder names sorted.")
@click.option("--image-size", callback=_size, default=None, metavar="HxW",
              help="Input size (default: the model's own when its file fixes it, else the images').")
@click.option("--resize", type=click.Choice(["stretch", "center_crop"]), default=None,
              help="stretch to the size (default), or keep the aspect and cut out the centre (87.5 %).")
@click.option("--arch", default=None, help="The architecture of a state dict (.pt/.pth/.safetensors), e.g. resnet18.")
@click.option("--name", default=None, help="The run's name (default: the model file's).")
@click.option("--deploy", is_flag=True,
              help="Also promote the winner in the MLflow registry (alias champion) and deploy it (./deploy/<name>).")
@click.option("--force", is_flag=True, help="Go on when your model scores near chance on your validation images.")
@click.option("--no-cache", is_flag=True, help="Re-run every step.")
@click.option("-v", "--verbose", is_flag=True, help="Show the libraries' own log lines here too.")
@set_option
@json_option
def optimize(model: Path, data: Path, target: str, formats: Optional[list], precisions: Optional[list],
             max_drop: float, output: Optional[Path], mean: Optional[str], std: Optional[str], labels: Optional[Path],
             image_size: Optional[Tuple[int, int]], resize: Optional[str], arch: Optional[str], name: Optional[str],
             deploy: bool, force: bool, no_cache: bool, verbose: bool, overrides: Tuple[str, ...],
             as_json: bool) -> None:
    """Make MODEL (an ONNX file, or a state dict with --arch) the best model this CPU runs on your images.

    Every variant (formats x precisions x runtimes) is measured against MODEL in one loop, chosen on the
    validation split within --max-drop, reported on test; the winner's file(s), report.md, report.json and
    config.yaml (the full config: `edgeopt run -c OUTPUT/config.yaml` runs it again) go to --output.

    \b
    Example:
      edgeopt optimize model.onnx --data imgs/ --output out/
      edgeopt optimize resnet.pt --arch resnet18 --data imgs/ --mean imagenet --precisions fp32,int8,bf16
    """
    out = Out(as_json)
    from edgeopt.config import ConfigError
    from edgeopt_zenml.api import optimize_config, write_output

    try:
        cfg = optimize_config(model, data, overrides, target=target, formats=formats, precisions=precisions,
                              max_drop=max_drop, mean=mean, std=std, labels=labels, image_size=image_size,
                              resize=resize, arch=arch, name=name, deploy=deploy, force=force)
    except (ConfigError, ValueError) as err:
        out.fail(str(err))
    prepared = prepare(out, cfg)
    folder = output.expanduser().absolute() if output else Path.cwd() / f"{cfg.name}-optimized"
    t0 = time.perf_counter()
    summary, (report, files) = run_reported(
        out, prepared.config, verbose, after=lambda summary: write_output(folder, summary, prepared.config, prepared),
        enable_cache=not no_cache)
    written = [p.name for p in files.get("model_files", [])] + ["report.md", "report.json", "config.yaml"]
    out.say(f"wrote {', '.join(written)} to {folder} ({time.perf_counter() - t0:.1f} s)")
    code = 0 if summary["selection"].winner else EXIT_GATE
    if code:
        click.echo(f"edgeopt: no variant met the constraints: {summary['selection'].reason}", err=True)
    out.result({"ok": code == 0, "exit_code": code, **report})
    exit_now(code)
