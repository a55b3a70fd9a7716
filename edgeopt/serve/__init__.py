"""The local inference server over a deploy folder (``edgeopt serve``).

- :mod:`edgeopt.serve.store`: the bundle in service (verified, warmed up, its probabilities) and
  the store that swaps in a newly deployed one once it has loaded;
- :mod:`edgeopt.serve.inputs`: request bodies to a normalized batch (a JSON tensor, or image files
  decoded within a pixel budget);
- :mod:`edgeopt.serve.app`: the FastAPI app, its middlewares, and :func:`~edgeopt.serve.app.serve`;
- :mod:`edgeopt.serve.protocol`: uvicorn's h11 protocol with a deadline for receiving a request;
- :mod:`edgeopt.serve.guard`: the checks before serving (bind address, token, TLS files, Host names).
"""


class ServeError(RuntimeError):
    """The server cannot start (or a bundle cannot be served), phrased as one line for the user."""
