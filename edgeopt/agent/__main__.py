"""``python -m edgeopt.agent``: start the agent (options: ``--help``)."""

from edgeopt.agent.server import main

if __name__ == "__main__":
    main()
