"""The search's steps (``variants.search``): workers that run trials of one study, the study's report and
survivors, each survivor's full fine-tune, and the trials as MLflow runs. The study is its own cache
(a database): the workers and the report always run, and return at once when the study is complete."""

from typing import Annotated, List, Tuple

from zenml import step
from zenml.types import MarkdownString

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.plan import parse_config
from edgeopt.search.outcome import SearchReport, build_survivor, render, search_report
from edgeopt.search.study import run_worker
from edgeopt.search.trial_runs import log_trial_runs
from edgeopt.track.runs import TrackedRuns
from edgeopt_zenml.materializers import CheckpointMaterializer


@step(enable_cache=False)
def search_worker(dataset: Dataset, teacher: Checkpoint, bases: List[Checkpoint], config: dict,
                  worker: int) -> Annotated[dict, "search_worker"]:
    """Trials of the run's study until its budget is spent (a resumed study goes on where it stopped);
    what this worker ran. ``bases``: the checkpoints of ``variants.bases``, in its order."""
    cfg = parse_config(config)
    return run_worker(cfg, dataset, dict(zip(cfg.variants.bases, bases)), teacher, worker)


@step(enable_cache=False)
def search_summary(workers: List[dict], dataset: Dataset, bases: List[Checkpoint], config: dict) -> Tuple[
        Annotated[SearchReport, "search_report"], Annotated[MarkdownString, "search_table"],
        Annotated[dict, "survivors"]]:
    """Every trial of the study and why it stopped, and the survivors (after every worker); the survivors
    alone as well, what their fine-tunes depend on (cached while they stay the same)."""
    cfg = parse_config(config)
    report = search_report(cfg, dataset, dict(zip(cfg.variants.bases, bases)))
    return report, MarkdownString(render(report)), report.survivors_only().model_dump(mode="json")


@step(output_materializers=CheckpointMaterializer)
def finetune_survivor(survivors: dict, base: Checkpoint, kd_teacher: Checkpoint, dataset: Dataset, base_name: str,
                      slot: int, seed: int) -> Annotated[Checkpoint, "shrunk"]:
    """The survivor in ``slot``: the technique's full KD fine-tune, as a grid variant gets it (cached
    while the survivors stay the same)."""
    report = SearchReport.model_validate(survivors)
    return build_survivor(report, base_name, slot, base, kd_teacher, dataset, seed)


@step(enable_cache=False)
def track_search(report: SearchReport, search_table: MarkdownString, runs: TrackedRuns, tracking_uri: str) -> None:
    """Every trial as an MLflow run nested under the pipeline's run; the table on the parent run."""
    log_trial_runs(tracking_uri, runs.experiment_id, runs.parent_run_id, report, str(search_table), runs.tags)
