"""Search, not a grid: an Optuna study over the structural techniques' amounts (and their options), each
trial measured on the target before any fine-tune, short fine-tunes with successive halving for the
candidates that can still matter, the full fine-tune only for the survivors (docs/search.md).

- :mod:`edgeopt.search.space`: a trial's candidate and the rules it is judged by (no heavy import);
- :mod:`edgeopt.search.probe`: the cheap stage (build, export, quantize, measure) and the short fine-tunes;
- :mod:`edgeopt.search.study`: the study in its database and the worker that runs trials of it;
- :mod:`edgeopt.search.outcome`: every trial and why it stopped, the survivors, the survivors' full build;
- :mod:`edgeopt.search.trial_runs`: the trials as MLflow runs nested under the pipeline's run.

From a notebook::

    run_worker(cfg, dataset, {"teacher": teacher}, teacher)          # until the budget is spent
    report = search_report(cfg, dataset, {"teacher": teacher})
    print(render(report))
"""
