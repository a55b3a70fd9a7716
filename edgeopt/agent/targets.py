"""Evaluation on the run's targets: every model measured on each device by its agent, with the
protocol and the results of :mod:`edgeopt.measure.evaluate` (the pipeline's side; the device runs
:mod:`edgeopt.agent.server`)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgeopt.agent.client import Agent, AgentError, pack_job
from edgeopt.agent.client import measured as measured_from
from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.config import DeviceTargetConfig, TargetConfig, resolve_path
from edgeopt.measure.evaluate import (
    ACCURACY_SPLITS,
    Champion,
    Evaluation,
    accuracy_inputs,
    accuracy_labels,
    assemble,
    evaluation_sources,
    latency_input,
    protocol_settings,
    runnable,
)
from edgeopt.measure.latency import Measured

log = logging.getLogger(__name__)


def target_aliases(alias: str, devices: List[DeviceTargetConfig]) -> Dict[str, str]:
    """The registry alias of each target's champion: the first target's is ``alias`` (it drives the
    deploy folder), every other one's ``<alias>-<label>``."""
    return {d.label: alias if i == 0 else f"{alias}-{d.label}" for i, d in enumerate(devices)}


def agent_for(device: DeviceTargetConfig):
    """The client of a target's agent, with the token from its environment variable (one line if unset)."""
    token = os.environ.get(device.token_env)
    if not token:
        raise AgentError(f"the environment variable {device.token_env} (the agent's token) is not set")
    return Agent(device.url, token, device.timeout_s, resolve_path(device.ca_file) if device.ca_file else None)


def preflight_targets(devices: List[DeviceTargetConfig]) -> List[Dict[str, Any]]:
    """Check that every target's agent answers and takes its token, before any work; returns their
    /info answers. Raises :class:`edgeopt.agent.client.AgentError` with one line naming the target."""
    infos = []
    for d in devices:
        try:
            infos.append(agent_for(d).info())
        except AgentError as err:
            raise AgentError(f"target {d.label}: {err}" + (f" (${d.token_env})" if "refused the token" in str(err)
                                                            else "")) from None
    return infos


def evaluate_on_device(
    models: List[ModelArtifact],
    evaluations: Dict[str, List[str]],
    dataset: Dataset,
    reference: str,
    target: TargetConfig,
    device: DeviceTargetConfig,
    champion: Optional[Champion] = None,
) -> Evaluation:
    """As :func:`evaluate_variants`, measured on ``device`` by its agent: one job with every model,
    the val then the test images (:func:`edgeopt.measure.evaluate.accuracy_inputs`: the agent predicts
    whatever it gets, the predictions are split back here) and the latency batch. A model the agent
    cannot take (a runtime it does not offer, over its size cap) fails alone; an agent that does not
    answer or drops the job fails every model of this device with the reason, and the run goes on."""
    target = target.model_copy(update={"threads": device.threads or target.threads})
    sources = evaluation_sources(models, evaluations)
    device_info: Dict[str, Any] = {"url": device.url, "label": device.label}
    fingerprint: Dict[str, Any] = {"id": "unknown", "cpu": "unknown", "cores": None, "isa": []}
    measured: Dict[str, Measured] = {}
    refused: Dict[str, str] = {}
    error = None
    try:
        agent = agent_for(device)
        about = agent.info()
        fingerprint = about["fingerprint"]
        job: Dict[str, Tuple[str, Path, List[Path]]] = {}
        for name, (m, rt) in runnable(sources, champion).items():
            if rt not in about["runtimes"]:
                refused[name] = f"runtime {rt} is not offered by the agent on {device.label}"
            elif m.model_bytes > about["max_model_bytes"]:
                refused[name] = (f"model of {m.model_bytes / 1e6:.2f} MB over the cap of the agent on {device.label} "
                                 f"({about['max_model_bytes'] / 1e6:.2f} MB)")
            else:
                files = [m.path / f for f in m.manifest["files"] if f.startswith("model.")]
                job[name] = (rt, m.model_file, files)
        with tempfile.TemporaryDirectory(prefix="edgeopt-job-") as tmp:
            packed = pack_job(Path(tmp) / "job.tar", protocol_settings(target), job, accuracy_inputs(dataset),
                              sum(dataset.size(s) for s in ACCURACY_SPLITS), latency_input(dataset, target.batch))
            log.info("evaluate: %d models -> %s (%s), %.1f MB", len(job), device.label, device.url,
                     packed.stat().st_size / 1e6)
            answer = agent.run(packed)
        measured = measured_from(answer)
        device_info.update({"job": answer["job"], "job_s": answer["job_s"], "peak_rss_mb": answer["peak_rss_mb"]})
    except AgentError as err:
        error = f"target {device.label}: {err}"
        log.warning("evaluate: %s", error)
    return assemble(sources, champion, measured, accuracy_labels(dataset), reference, target, fingerprint, refused,
                     device=device_info, error=error)


def evaluate_on_targets(
    models: List[ModelArtifact],
    evaluations: Dict[str, List[str]],
    dataset: Dataset,
    reference: str,
    target: TargetConfig,
    devices: List[DeviceTargetConfig],
    champions: Dict[str, Optional[Champion]],
) -> Evaluation:
    """Every model on every device (one after the other: a device's loop never shares the machine
    with another's), each with its own champion (``champions``: label -> champion). Returns the first
    device's evaluation with the others in ``others``."""
    evs = [evaluate_on_device(models, evaluations, dataset, reference, target, d, champions.get(d.label))
           for d in devices]
    return evs[0].model_copy(update={"others": evs[1:]})
