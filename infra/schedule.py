"""Schedule the compress pipeline on a stack whose orchestrator runs ZenML schedules.

    python infra/schedule.py -c infra/kubeflow/digits.yaml --cron "0 3 * * *" \\
        --zenml-config infra/kubeflow/run_config.yaml

ZenML hands the cron expression to the orchestrator (Kubeflow: a recurring run; Kubernetes: a
CronJob; also Vertex, SageMaker, Airflow, AzureML, Databricks), which then starts every run itself;
this script only registers the schedule and returns. Every scheduled run records
EDGEOPT_TRIGGER=schedule with its promotion. Manage schedules with `zenml pipeline schedule list` /
`delete`.

The local orchestrator (the default stack) cannot run schedules; ZenML refuses them. On the local
stack, schedule the CLI instead: infra/cron/edgeopt.cron (cron) or .github/workflows/retrain.yml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeopt.config import ConfigError  # noqa: E402
from edgeopt.env import configure_local_state  # noqa: E402
from edgeopt.plan import load_config  # noqa: E402

configure_local_state()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Run config (YAML), as for `run.py run`.")
@click.option("--cron", "cron_expression", default="0 3 * * *", show_default=True,
              help="Cron expression (UTC on most orchestrators).")
@click.option("--name", default=None, help="Schedule name (default: <config name>-schedule).")
@click.option("--zenml-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ZenML run config with step settings, e.g. infra/kubeflow/run_config.yaml.")
def main(config: Path, cron_expression: str, name: str | None, zenml_config: Path | None) -> None:
    """Register a cron schedule for the compress pipeline on the active ZenML stack."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    from zenml import Model
    from zenml.client import Client
    from zenml.config.schedule import Schedule

    from edgeopt_zenml.pipelines.compress import compress
    from edgeopt_zenml.pipelines.runner import use_checkout_as_source_root

    use_checkout_as_source_root()
    stack = Client().active_stack
    if not stack.orchestrator.config.is_schedulable:
        raise click.ClickException(
            f"the active stack '{stack.name}' ({stack.orchestrator.flavor} orchestrator) cannot run schedules; "
            "switch to a stack that can (infra/kubeflow/README.md) or use infra/cron/edgeopt.cron")
    schedule = Schedule(name=name or f"{cfg.name}-schedule", cron_expression=cron_expression)
    p = compress.with_options(
        run_name=f"{cfg.name}-{{date}}-{{time}}", schedule=schedule,
        model=Model(name=cfg.registry.name, description="edgeopt: Pareto-best edge model", tags=["edgeopt"]),
        environment={"EDGEOPT_TRIGGER": "schedule"},
        config_path=str(zenml_config) if zenml_config else None,
    )
    p(config=cfg.model_dump(mode="json"))
    click.echo(f"scheduled '{schedule.name}': {cfg.name} at '{cron_expression}' on stack '{stack.name}'")


if __name__ == "__main__":
    main()
