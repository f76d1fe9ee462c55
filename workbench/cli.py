"""The ``workbench`` command: ``workbench serve [MODEL] [options]`` starts the steering server."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: workbench serve [MODEL] [vllm serve options] [workbench options]

  serve   vLLM's OpenAI-compatible server with per-request steering and capture
          (`workbench serve --help` lists every option)"""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] != "serve":
        sys.exit(f"workbench: unknown command {args[0]!r}\n{USAGE}")
    from workbench.serve.cli import main as serve

    serve(args[1:])


if __name__ == "__main__":
    main()
