"""``workbench serve [MODEL] [any vllm serve option] [workbench options]``.

Parses ``vllm serve``'s own options with vLLM's parser, plus ours, and
starts the server. Where a steered server departs from ``vllm serve``'s
defaults, it is for the same reasons as ``VLLMSteerModel``:

- no model: the embedded SmolLM2 (served as ``smollm2-135m-instruct``);
- the embedded model runs in float32 unless ``--dtype`` says otherwise;
- on CPU, eager mode unless ``--no-enforce-eager`` (compiling takes minutes
  there for little gain); on GPUs vLLM's default (CUDA graphs);
- on CPU, 2 GiB of KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` or
  ``--kv-cache-memory-bytes`` says otherwise.

Refused, with the reason: several API server processes and data parallelism
inside one server (vLLM reaches only the first engine with the worker calls
that load specs); run one server per replica behind a load balancer instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.serve.server import ServeOptions

DESCRIPTION = """vLLM's OpenAI-compatible server with per-request steering and activation capture.

Takes every `vllm serve` option (see `vllm serve --help`); without a model it
serves the embedded SmolLM2-135M-Instruct. Requests to /v1/completions and
/v1/chat/completions may carry `steering` and `capture_layers` (see the
workbench README, "Serving")."""


def add_workbench_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workbench", "Steering and capture")
    group.add_argument(
        "--steering-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of named specs (SteeringSpec.save files) and vectors (a VectorLibrary); "
        "repeat for several; specs written over HTTP go to the first",
    )
    group.add_argument("--max-steering-slots", type=int, default=64, help="distinct specs running at once (default 64)")
    group.add_argument(
        "--capture-ttl", type=float, default=600.0, metavar="SECONDS", help="unfetched captures expire (default 600)"
    )
    group.add_argument(
        "--capture-memory-gib",
        type=float,
        default=4.0,
        metavar="GIB",
        help="rows of running and unfetched captures held at most (default 4)",
    )
    group.add_argument(
        "--worker-rpc-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest wait for a worker call: loading specs, fetching captures (default 300)",
    )


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ServeOptions]:
    """vLLM's arguments (with our defaults applied) and the ``ServeOptions``."""
    from workbench.config import is_cpu_platform
    from workbench.embedded import DEFAULT_MODEL_NAME, resolve_model_name
    from workbench.serve import _vllm_server as vs
    from workbench.serve.server import ServeOptions

    parser = vs.build_parser(DESCRIPTION)
    add_workbench_options(parser)
    parser.set_defaults(model=DEFAULT_MODEL_NAME, enforce_eager=None)
    args = parser.parse_args(list(argv))
    if args.model_tag is not None:
        args.model = args.model_tag
    for option, value, ok in (
        ("--api-server-count", args.api_server_count, args.api_server_count in (None, 1)),
        ("--data-parallel-size", args.data_parallel_size, args.data_parallel_size == 1),
        ("--headless", args.headless, not args.headless),
        ("--grpc", getattr(args, "grpc", False), not getattr(args, "grpc", False)),
    ):
        if not ok:
            parser.error(
                f"{option} {value}: a steering server runs one API server over one engine (specs are loaded "
                "into that engine's workers); run several servers behind a load balancer to scale out"
            )
    if args.max_steering_slots < 1 or args.capture_ttl <= 0 or args.capture_memory_gib <= 0:
        parser.error("--max-steering-slots, --capture-ttl and --capture-memory-gib must be positive")
    requested = args.model
    args.model = resolve_model_name(requested)
    if args.served_model_name is None and args.model != requested:
        args.served_model_name = [requested]  # the name it was asked by, not the converted checkpoint's path
    if args.enforce_eager is None:
        args.enforce_eager = is_cpu_platform()
    args.api_server_count = None
    vs.validate_parsed_serve_args(args)
    options = ServeOptions(
        steering_dirs=tuple(Path(folder) for folder in args.steering_dir),
        max_steering_slots=args.max_steering_slots,
        capture_ttl_s=args.capture_ttl,
        capture_memory_gib=args.capture_memory_gib,
        rpc_timeout_s=args.worker_rpc_timeout,
        requested_model=requested,
    )
    return args, options


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server (``workbench serve ...`` / ``python -m workbench.serve ...``)."""
    from workbench.logs import server_logging

    server_logging()  # before vLLM is imported: it reads its log level once
    from workbench.config import engine_environment
    from workbench.serve import _vllm_server as vs
    from workbench.serve.server import run_server

    args, options = parse_args(sys.argv[1:] if argv is None else argv)
    vs.prepare_logging(args)
    os.environ.update(engine_environment())

    # As vLLM's run_server: SIGTERM before uvicorn installs its own handlers interrupts the start.
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        import uvloop

        uvloop.run(run_server(args, options))
    except KeyboardInterrupt:
        pass
