"""``workbench serve``: vLLM's OpenAI-compatible server on a steered engine.

The same steps as vLLM's ``run_server``, with ours between them:

1. bind the socket (before the engine starts, as vLLM does);
2. start vLLM's engine client with the runtime added to its arguments
   (``config.steered_engine_args``), and wrap its ``generate`` so ticketed
   requests run steered (``ServerSteering``);
3. set the workers up (``EngineLink.ensure_ready``);
4. build vLLM's app and state, add our routes and the middleware (innermost,
   so vLLM's authentication and CORS run first);
5. serve until shut down, then close the engine.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.middleware import Middleware

from workbench import __version__
from workbench.config import steered_engine_args
from workbench.engine_link import EngineLink
from workbench.serve import _vllm_server as vs
from workbench.serve.captures import CaptureRegistry
from workbench.serve.middleware import SteeringMiddleware
from workbench.serve.request_fields import ModelShape
from workbench.serve.routes import ServerState, router
from workbench.serve.spec_store import SpecStore
from workbench.serve.steering import ServerSteering

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """The server's own options (beside every ``vllm serve`` option)."""

    steering_dirs: tuple[Path, ...] = ()
    """Folders of named specs and vectors; specs written over HTTP go to the first."""
    max_steering_slots: int = 64
    """Distinct specs that run at once (requests beyond wait for a slot)."""
    capture_ttl_s: float = 600.0
    """Unfetched captures are freed this long after their request ended."""
    capture_memory_gib: float = 4.0
    """Rows of running and unfetched captures held at most."""
    rpc_timeout_s: float = 300.0
    """Longest wait for a worker call (loading specs, fetching captures)."""
    requested_model: str = ""
    """The model as asked for (the embedded model's name, or what vLLM loads)."""


async def run_server(args: argparse.Namespace, options: ServeOptions) -> None:
    """Serve until the server is shut down (SIGINT / SIGTERM)."""
    from vllm import AsyncEngineArgs

    listen_address, sock = vs.setup_server(args, reuse_port=False)
    engine_args = steered_engine_args(
        AsyncEngineArgs.from_cli_args(args), options.max_steering_slots, options.requested_model
    )
    async with vs.open_engine(engine_args) as engine:
        state = await _start_steering(engine, args, options)
        supported_tasks = await engine.get_supported_tasks()
        app = vs.build_app(args, supported_tasks, engine.model_config)
        await vs.init_app_state(engine, app.state, args, supported_tasks)
        install(app, state)
        logger.info("workbench %s: steering server on %s", __version__, listen_address)
        shutdown = await vs.serve(app, sock, args)
    try:
        await shutdown
    finally:
        sock.close()
        state.steering.captures.close()
        state.steering.link.close()


async def _start_steering(engine: Any, args: argparse.Namespace, options: ServeOptions) -> ServerState:
    link = EngineLink(
        engine,
        num_slots=options.max_steering_slots,
        rpc_timeout_s=lambda: options.rpc_timeout_s,
        restart_hint="restart the server",
    )
    await link.ensure_ready()
    captures = CaptureRegistry(
        link,
        ttl_s=options.capture_ttl_s,
        memory_limit=int(options.capture_memory_gib * 2**30),
        tokenizer=engine.get_tokenizer,
    )
    steering = ServerSteering(link, captures)
    vs.wrap_generate(engine, steering.generate)
    import vllm

    served = args.served_model_name or [args.model]
    info = {
        "model": served[0],
        "model_path": args.model,
        "hidden_size": link.hidden_size,
        "layer_count": link.layer_count,
        "dtype": str(link.dtype).removeprefix("torch."),
        "max_model_len": link.max_model_len,
        "max_steering_slots": options.max_steering_slots,
        "capture_ttl_s": options.capture_ttl_s,
        "steering_dirs": [str(folder) for folder in options.steering_dirs],
        "workbench_version": __version__,
        "vllm_version": vllm.__version__,
    }
    return ServerState(
        steering=steering,
        store=SpecStore(options.steering_dirs),
        model=ModelShape(link.hidden_size, link.layer_count, link.dtype),
        info=info,
        tokenizer=engine.get_tokenizer,
    )


def install(app: Any, state: ServerState) -> None:
    """Add our routes and the middleware to vLLM's app (before it starts serving)."""
    app.state.workbench = state
    app.include_router(router)
    # Innermost of the user middleware: vLLM's authentication and CORS see the request first.
    app.user_middleware.append(
        Middleware(SteeringMiddleware, steering=state.steering, model=state.model, store=state.store)
    )
    # vLLM's app may have built its middleware stack already (the SageMaker bootstrap
    # does, 0.32): build it again, as that bootstrap does after adding its own.
    app.middleware_stack = app.build_middleware_stack()
