"""Engine settings: ``VLLMSteeringConfig`` and the vLLM engine arguments it becomes.

A steered engine is a plain vLLM engine with our load format, worker
extension and settings added (``workbench.wire``), and a hash of the
runtime's code in vLLM's compile-cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import __version__, wire
from workbench.embedded import DEFAULT_MODEL_NAME, EMBEDDED_DTYPE, is_embedded, resolve_model_name
from workbench.errors import EngineConfigError

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 2 << 30
"""KV cache of a CPU engine unless VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes says otherwise."""

_PACKAGE = Path(__file__).parent
_RUNTIME_SOURCES = (_PACKAGE / "ops.py", _PACKAGE / "wire.py", _PACKAGE / "specs.py")
"""Code the workers run besides ``workbench/runtime/``."""


@dataclass
class VLLMSteeringConfig:
    """Engine settings. ``model_name`` is a Hugging Face name or path, or the
    embedded default ``smollm2-135m-instruct``."""

    model_name: str = DEFAULT_MODEL_NAME
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 2048
    dtype: str = "auto"
    """vLLM's dtype; ``auto`` is vLLM's choice for the checkpoint, except for
    the embedded model, which runs in float32 (``embedded.EMBEDDED_DTYPE`` says why)."""
    max_steering_slots: int = 64
    """Distinct steering specs that can run at once (requests beyond it wait)."""
    load_format: str = "auto"
    """vLLM load format of the weights (``dummy`` for benchmarks)."""
    seed: int = 0
    rpc_timeout_s: float = 300.0
    """Longest wait for a worker RPC (loading a spec, fetching captures) before
    ``WorkerTimeoutError``; generation itself has no time limit."""
    model_runner: str = "auto"
    """vLLM's model runner: ``auto`` (vLLM's choice: V2 for dense models on CUDA,
    V1 on CPU), ``v1`` or ``v2``."""
    layers_path: str | None = None
    """Dotted path of the decoder layers' ModuleList in vLLM's model (e.g. ``model.layers``);
    by default the outermost ModuleList holding the config's number of layers."""
    capture_budget_bytes: int | None = None
    """Host memory that captured rows not yet fetched may hold: capturing
    requests wait for room before they start (rows are reserved at prompt +
    ``max_tokens`` per layer, the request's real rows once it finished, until
    fetched or released), and one that alone needs more raises
    ``CaptureBudgetError``. None: half the free shared memory when the engine starts."""
    log_file: str | None = None
    """Where the engine processes' output goes (default: this process's stderr).
    vLLM logs at WARNING unless ``WORKBENCH_LOG_LEVEL`` or ``VLLM_LOGGING_LEVEL`` says otherwise."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further ``AsyncEngineArgs`` fields."""


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def runtime_salt() -> str:
    """Hash of the code that runs inside vLLM's workers. It goes into vLLM's
    ``additional_config`` and hence into its compile-cache key, so a steered
    engine never reuses a graph compiled without (or with older) steering
    code, and plain vLLM never picks up ours."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted((_PACKAGE / "runtime").glob("*.py")) + list(_RUNTIME_SOURCES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def engine_environment(model_runner: str = "auto") -> dict[str, str]:
    """Environment the engine processes start with (they inherit it): our
    defaults where the user set nothing, and the model runner asked for."""
    if model_runner not in wire.MODEL_RUNNER_ENV:
        raise EngineConfigError(f"model_runner must be one of {sorted(wire.MODEL_RUNNER_ENV)}, got {model_runner!r}")
    defaults = {key: value for key, value in wire.ENGINE_ENV_DEFAULTS.items() if key not in os.environ}
    return {**defaults, **wire.MODEL_RUNNER_ENV[model_runner]}


def steered_engine_args(
    args: Any, num_slots: int, requested_model: str | None = None, layers_path: str | None = None
) -> Any:
    """vLLM's ``AsyncEngineArgs`` with the runtime added: the ``workbench``
    load format wrapping the one asked for, the worker extension, and our
    settings (with the compile-cache salt) in ``additional_config``.

    Also the defaults a steered engine takes where the caller left vLLM's:
    the embedded model (``requested_model``) runs in float32, and a CPU
    engine reserves ``CPU_KV_CACHE_BYTES`` of KV cache and runs its one worker
    in the engine-core process. The engine's processes learn this process's id
    (``wire.CLIENT_PID_ENV``), to shut down if it dies. Everything else the
    caller set is kept; a worker extension of their own is refused, since
    vLLM takes only one, and so is ``kv_sharing_fast_prefill``.
    """
    if args.worker_extension_cls and args.worker_extension_cls != wire.WORKER_EXTENSION:
        raise EngineConfigError(
            f"worker_extension_cls {args.worker_extension_cls!r}: a steered engine needs vLLM's "
            f"one worker extension slot for {wire.WORKER_EXTENSION}"
        )
    if args.kv_sharing_fast_prefill:
        # vLLM then runs the layers after the KV-sharing ones (Gemma 3n, Gemma 4) on the rows
        # that sample alone: the prompt's other rows there could be neither steered nor captured.
        raise EngineConfigError(
            "kv_sharing_fast_prefill=True: the layers after the KV-sharing ones would see only the "
            "rows that sample, so a steered engine cannot steer or capture the others; leave it off"
        )
    extra = args.model_loader_extra_config or {}
    if not isinstance(extra, Mapping):
        raise EngineConfigError(f"model_loader_extra_config must be a dict for a steered engine, got {extra!r}")
    extra = dict(extra)
    if args.load_format != wire.LOAD_FORMAT:
        extra[wire.INNER_LOAD_FORMAT_KEY] = str(args.load_format)
    settings = wire.EngineSettings(num_slots=num_slots, runtime=runtime_salt(), layers_path=layers_path)
    changes: dict[str, Any] = {
        "load_format": wire.LOAD_FORMAT,
        "model_loader_extra_config": extra,
        "worker_extension_cls": wire.WORKER_EXTENSION,
        "additional_config": {**(args.additional_config or {}), **settings.to_additional_config()},
    }
    if requested_model is not None and args.dtype == "auto" and is_embedded(requested_model):
        changes["dtype"] = EMBEDDED_DTYPE
    if is_cpu_platform() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ and args.kv_cache_memory_bytes is None:
        # On CPU, vLLM otherwise reserves gpu_memory_utilization of *host*
        # memory, so a second engine in the same machine cannot start.
        changes["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if is_cpu_platform() and args.distributed_executor_backend is None and _one_worker(args):
        changes["distributed_executor_backend"] = in_engine_core_executor()
    # The engine's processes are spawned from this one and inherit its environment.
    os.environ[wire.CLIENT_PID_ENV] = str(os.getpid())
    return dataclasses.replace(args, **changes)


def _one_worker(args: Any) -> bool:
    return args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size == 1


def in_engine_core_executor() -> type:
    """vLLM's executor that runs the one worker inside the engine-core process.

    vLLM's CPU platform swaps its name ("uni") for the multiprocessing executor,
    to set up OpenMP in a fresh process. The engine core is itself a freshly
    spawned process, so a second one buys nothing there and costs: two
    processes each importing vLLM (~8 s more per engine start on 2 cores) and
    competing for the cores (~2/3 of the throughput). Given as a class, the
    executor is taken as it is.
    """
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor


def engine_args(cfg: VLLMSteeringConfig, enforce_eager: bool, **engine_kwargs: Any) -> Any:
    """The ``AsyncEngineArgs`` of a steered engine for ``cfg`` (``steered_engine_args``)."""
    from vllm import AsyncEngineArgs

    args = AsyncEngineArgs(
        model=resolve_model_name(cfg.model_name),
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        dtype=cfg.dtype,
        seed=cfg.seed,
        enforce_eager=enforce_eager,
        load_format=cfg.load_format,
        **{**cfg.engine_kwargs, **engine_kwargs},
    )
    return steered_engine_args(args, cfg.max_steering_slots, cfg.model_name, cfg.layers_path)
