"""The main pipeline: data -> teacher -> KD student -> prune x export x quantize -> evaluate ->
select -> track -> promote -> deploy. Static (one invocation per variant, each with its own id),
so it compiles to Kubeflow as parallel branches as well as it runs on the local orchestrator."""

from zenml import pipeline

from edgeopt.config import SCHEMES_FOR_FORMAT, RunConfig
from edgeopt.pretrained import file_sha256
from steps import (
    deploy,
    distill_student,
    evaluate,
    export,
    load_data,
    promote,
    quantize,
    select,
    shrink,
    track,
    train_teacher,
)


@pipeline
def compress(config: dict) -> None:
    cfg = RunConfig.model_validate(config)
    v = cfg.variants
    dataset = load_data(data=cfg.data.model_dump(mode="json"), seed=cfg.seed)
    source = cfg.teacher.source
    teacher = train_teacher(dataset, teacher=cfg.teacher.model_dump(mode="json"), seed=cfg.seed,
                            source_sha256=file_sha256(source) if source else None)
    student = distill_student(dataset, teacher, student=cfg.student.model_dump(mode="json"), seed=cfg.seed)
    teacher_onnx = export(teacher, dataset, fmt="onnx", id="export_teacher_onnx")
    models = [teacher_onnx]
    for method, amount, tag in v.shrinks():
        ckpt = student if method == "none" else shrink(
            student, teacher, dataset, method=method, amount=amount,
            options=getattr(v, method).model_dump(mode="json"),
            seed=cfg.seed, id=f"shrink_{tag}",
        )
        for fmt in v.formats:
            fp32 = export(ckpt, dataset, fmt=fmt, id=f"export_{tag}_{fmt}")
            for scheme in v.quantization:
                if scheme not in SCHEMES_FOR_FORMAT[fmt]:
                    continue
                models.append(fp32 if scheme == "fp32" else quantize(
                    fp32, dataset, scheme=scheme, quant=v.quant.model_dump(mode="json"), seed=cfg.seed,
                    id=f"quantize_{tag}_{fmt}_{scheme}",
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
