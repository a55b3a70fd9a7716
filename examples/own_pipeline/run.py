"""Run this project's pipeline on scikit-learn's digits:

    python run.py --state own-state        # MLflow store and deploy folder under --state

It needs edgeopt installed (``pip install edgeopt`` or the wheel), nothing from edgeopt's checkout.
"""

import argparse
from pathlib import Path

from pipelines import edge_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=Path(".state"), help="MLflow store and deploy folder")
    parser.add_argument("--run-name", default=None, help="ZenML run name")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    state = args.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    edge_pipeline.with_options(run_name=args.run_name)(
        tracking_uri=f"sqlite:///{state / 'mlflow.db'}", deploy_root=str(state / "deploy"), epochs=args.epochs,
    )


if __name__ == "__main__":
    main()
