"""``python -m workbench.serve [MODEL] [options]``: the steering server (see ``workbench.serve.cli``)."""

from workbench.serve.cli import main

if __name__ == "__main__":
    main()
