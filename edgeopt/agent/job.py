"""One agent job, in a process of its own: ``python -m edgeopt.agent.job <folder>``.

The folder holds the unpacked job (``job.json``, ``inputs.npy``, ``latency.npy``, ``models/``); the
answer is written to ``<folder>/result.json``. A process per job gives the job its own peak memory
(``ru_maxrss``), lets the server kill it at the time budget, and frees everything it loaded.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np

from edgeopt.measure.latency import ACCURACY_BATCH, measure_models


def run(folder: Path) -> Dict[str, Any]:
    spec = json.loads((folder / "job.json").read_text())
    inputs = np.load(folder / "inputs.npy", mmap_mode="r")
    x = np.ascontiguousarray(np.load(folder / "latency.npy"))
    models = {m["key"]: (m["runtime"], folder / m["file"]) for m in spec["models"]}
    s = spec["settings"]
    t = time.perf_counter()
    measured = measure_models(
        models, lambda: (np.ascontiguousarray(inputs[i:i + ACCURACY_BATCH]) for i in range(0, len(inputs), ACCURACY_BATCH)),
        x, threads=s["threads"], batch=s["batch"], warmup=s["warmup"], iterations=s["iterations"],
        time_budget_s=s.get("time_budget_s"), rounds=s.get("rounds", 5),
    )
    return {
        "models": {
            k: {
                "error": m.error,
                "predictions": m.predictions.tolist() if m.predictions is not None else None,
                "coverage": m.coverage,
                "settings": m.settings,
                "latency": asdict(m.latency) if m.latency is not None else None,
            }
            for k, m in measured.items()
        },
        "measure_s": time.perf_counter() - t,
        # Linux reports kilobytes: the peak resident memory of this job's process
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    folder = Path(sys.argv[1])
    (folder / "result.json").write_text(json.dumps(run(folder), default=str))


if __name__ == "__main__":
    main()
