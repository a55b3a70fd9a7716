"""The main pipeline: data -> teacher -> KD student -> prune x export x quantize -> evaluate ->
select -> track -> promote -> deploy. Static (one invocation per variant, each with its own id),
so it compiles to Kubeflow as parallel branches as well as it runs on the local orchestrator."""

from zenml import pipeline

from edgeopt.config import RunConfig
from steps import (
    deploy,
    distill_student,
    evaluate,
    export,
    load_data,
    promote,
    prune,
    quantize,
    select,
    track,
    train_teacher,
)


def ratio_tag(ratio: float) -> str:
    return f"p{round(ratio * 100)}"


@pipeline
def compress(config: dict) -> None:
    cfg = RunConfig.model_validate(config)
    v = cfg.variants
    dataset = load_data(data=cfg.data.model_dump(mode="json"), seed=cfg.seed)
    teacher = train_teacher(dataset, teacher=cfg.teacher.model_dump(mode="json"), seed=cfg.seed)
    student = distill_student(dataset, teacher, student=cfg.student.model_dump(mode="json"), seed=cfg.seed)
    teacher_onnx = export(teacher, dataset, fmt="onnx", id="export_teacher_onnx")
    models = [teacher_onnx]
    for ratio in v.prune_ratios:
        tag = ratio_tag(ratio)
        ckpt = student if ratio == 0 else prune(
            student, teacher, dataset, ratio=ratio, prune=v.prune.model_dump(mode="json"), seed=cfg.seed,
            id=f"prune_{tag}",
        )
        for fmt in v.formats:
            fp32 = export(ckpt, dataset, fmt=fmt, id=f"export_{tag}_{fmt}")
            for scheme in v.quantization:
                models.append(fp32 if scheme == "fp32" else quantize(
                    fp32, dataset, scheme=scheme, calibration_samples=v.quant.calibration_samples,
                    seed=cfg.seed, id=f"quantize_{tag}_{fmt}_{scheme}",
                ))
    uri = cfg.tracking_uri()
    evaluation = evaluate(models, dataset, teacher, teacher_onnx, runtimes=list(v.runtimes),
                          target=cfg.target.model_dump(mode="json"), tracking_uri=uri,
                          registered_model=cfg.registry.name, alias=cfg.registry.alias)
    selection, decision, report, plot = select(
        evaluation, constraints=cfg.target.constraints.model_dump(mode="json"), objective=cfg.selection.objective,
        promotion=cfg.promotion.model_dump(mode="json"),
    )
    runs = track(evaluation, selection, decision, report, plot, models, dataset, config=config, tracking_uri=uri,
                 experiment=cfg.tracking.experiment)
    promotion = promote(evaluation, selection, decision, runs, tracking_uri=uri,
                        registered_model=cfg.registry.name, alias=cfg.registry.alias)
    deploy(promotion, dataset, tracking_uri=uri, registered_model=cfg.registry.name, alias=cfg.registry.alias,
           root=str(cfg.deploy_root()), keep=cfg.deploy.keep)
