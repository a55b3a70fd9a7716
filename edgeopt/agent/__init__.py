"""The edge agent: measures models on the device they will run on, with the protocol of ``evaluate``.

``python -m edgeopt.agent`` (or ``edgeopt agent`` where the whole project is installed) serves a
small token-protected HTTP API on the device; ``evaluate`` sends it one job per run with every
variant, the reference and the champion, and gets back what :func:`edgeopt.measure.latency.measure_models`
measured there. The device needs numpy, ONNX Runtime and/or OpenVINO, onnx, pydantic, starlette and
uvicorn (``infra/agent/requirements.txt``): no torch, ZenML or MLflow.

- :mod:`edgeopt.agent.server`: the API and its bounds (token, model size cap, time budget per job,
  one job at a time, the job's folder removed after it);
- :mod:`edgeopt.agent.job`: one job, in a process of its own (killed at the time budget; its peak
  memory is the job's);
- :mod:`edgeopt.agent.client`: the pipeline's side of one agent (pre-flight, packing and sending a job);
- :mod:`edgeopt.agent.targets`: every model evaluated on each of the run's devices through its agent.

A job is one uncompressed tar: ``job.json`` (settings and the list of models), ``inputs.npy``
(the normalized test images, for accuracy), ``latency.npy`` (the batch every model is timed on) and
``models/<n>/model.onnx`` or ``models/<n>/model.xml`` + ``model.bin``.
"""

TOKEN_ENV = "EDGEOPT_AGENT_TOKEN"  # where the agent reads its token by default
MIN_TOKEN_CHARS = 16  # the shortest token the agent and the server (edgeopt.serve.guard) accept
DEFAULT_PORT = 8765
