"""``python run.py ...`` from a checkout is the installed ``edgeopt`` command (edgeopt_zenml/cli.py)."""

from edgeopt_zenml.cli import main

if __name__ == "__main__":
    main()
