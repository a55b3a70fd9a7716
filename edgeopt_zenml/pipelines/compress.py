"""The main pipeline, wired from the variant plan (``edgeopt.plan.variants``): data -> teacher (trained or
brought) -> KD student -> per base: shrink x export x precision -> evaluate -> select -> track ->
promote -> deploy (these two skipped with ``deploy.enabled: false``: export only). Static (one invocation
per variant, each with its own id), so it compiles to Kubeflow as parallel branches as well as it runs
on the local orchestrator."""

from zenml import pipeline

from edgeopt.agent.targets import target_aliases
from edgeopt.models.brought import file_sha256
from edgeopt.plan import parse_config, variant_plan
from edgeopt_zenml.steps import (
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
from edgeopt_zenml.steps.search import finetune_survivor, search_summary, search_worker, track_search
from edgeopt_zenml.steps.targets import track_targets


def _search(plan, config: dict, dataset, teacher, bases: list):
    """``variants.search``: its workers (parallel where the orchestrator runs steps in parallel), then the
    study's report, table and survivors."""
    workers = [search_worker(dataset, teacher, bases, config=config, worker=i, id=step_id)
               for i, step_id in enumerate(plan.search_workers)]
    return search_summary(workers, dataset, bases, config=config)


@pipeline
def compress(config: dict) -> None:
    cfg = parse_config(config)
    plan = variant_plan(cfg)
    v = cfg.variants
    dataset = load_data(data=cfg.data.model_dump(mode="json"), seed=cfg.seed)
    source = cfg.teacher.source
    teacher = train_teacher(dataset, teacher=cfg.teacher.model_dump(mode="json"), seed=cfg.seed,
                            source_sha256=file_sha256(source) if source else None)
    bases = {"teacher": teacher}
    if cfg.student is not None and "student" in v.bases:
        start = cfg.student.checkpoint
        bases["student"] = distill_student(dataset, teacher, student=cfg.student.model_dump(mode="json"),
                                           seed=cfg.seed, source_sha256=file_sha256(start) if start else None)
    searched = _search(plan, config, dataset, teacher, [bases[b] for b in v.bases]) if v.search is not None else None
    checkpoints = {}
    for s in plan.shrinks:
        if s.searched:  # the search's survivor in this slot, fully fine-tuned
            assert searched is not None
            checkpoints[s.key] = finetune_survivor(searched[2], bases[s.base], teacher, dataset, base_name=s.base,
                                                   slot=s.slot, seed=cfg.seed, id=s.step_id)
        elif s.technique is None:
            checkpoints[s.key] = bases[s.base]
        else:
            checkpoints[s.key] = shrink(
                bases[s.base], teacher, dataset, technique=s.technique, amount=s.amount,
                options={**v.shrink[s.technique].model_dump(mode="json"), "amounts": [s.amount]}, seed=cfg.seed,
                id=s.step_id,
            )
    exports, models = {}, []
    for b in plan.builds:
        if b.export_id not in exports:
            exports[b.export_id] = export(checkpoints[b.shrink.key], dataset, fmt=b.format, variant=b.fp32_name,
                                          id=b.export_id)
        fp32 = exports[b.export_id]
        models.append(fp32 if b.precision == "fp32" else quantize(
            fp32, dataset, scheme=b.precision, quant=v.quant.model_dump(mode="json"), seed=cfg.seed,
            variant=b.name, id=b.quantize_id,
        ))
    uri = cfg.tracking_uri()
    evaluation = evaluate(models, dataset, evaluations=plan.evaluations(), reference=plan.reference_name,
                          target=cfg.target.model_dump(mode="json"), tracking_uri=uri,
                          registered_model=cfg.registry.name, alias=cfg.registry.alias,
                          targets=[t.model_dump(mode="json") for t in cfg.targets] or None)
    selection, decision, report, plot, target_selections = select(
        evaluation, constraints=cfg.target.constraints.model_dump(mode="json"), objective=cfg.selection.objective,
        promotion=cfg.promotion.model_dump(mode="json"),
        aliases=target_aliases(cfg.registry.alias, cfg.targets) or None,
    )
    runs = track(evaluation, selection, decision, report, plot, models, dataset, config=config, tracking_uri=uri,
                 experiment=cfg.tracking.experiment)
    if searched is not None:  # every trial as a run nested under the pipeline's run
        track_search(searched[0], searched[1], runs, tracking_uri=uri)
    if not cfg.deploy.enabled:  # export only: selected, tracked and reported; nothing promoted or deployed
        return
    promotion = promote(evaluation, selection, decision, runs, tracking_uri=uri,
                        registered_model=cfg.registry.name, alias=cfg.registry.alias)
    if cfg.targets:  # per-device metrics; the other devices' winners to their own aliases
        track_targets(evaluation, target_selections, runs, tracking_uri=uri, registered_model=cfg.registry.name)
    deploy(promotion, tracking_uri=uri, registered_model=cfg.registry.name, alias=cfg.registry.alias,
           root=str(cfg.deploy_root()), keep=cfg.deploy.keep)
