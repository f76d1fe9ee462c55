"""The client API: ``VLLMSteerModel`` over vLLM's ``AsyncLLM`` in your process.

No tensor math here: specs are validated and encoded, requests are tagged
with their steering slot and capture, and captured rows are fetched from
the workers, all through ``workbench.engine_link``. The API itself
(steering state, ``generate``, ``chat``, ``sweep``) is ``SteerModel``'s,
shared with ``RemoteSteerModel``.

vLLM is imported with this module, not inside a call: importing it keeps
some exceptions it caught, whose tracebacks would hold the importing call's
frame (and so the model being built) alive after ``del model``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from workbench import errors, wire
from workbench.capture import CaptureHandle, MessageBoundary
from workbench.capture_budget import BudgetUse, CaptureBudget
from workbench.config import VLLMSteeringConfig, engine_args, engine_environment, is_cpu_platform
from workbench.engine_link import EngineLink, SteeredRun, weak_callback
from workbench.errors import (
    CaptureError,
    EngineClosedError,
    EngineStartError,
    HandleReleasedError,
    HiddenSizeError,
    SpecError,
    WorkbenchError,
)
from workbench.logs import EngineOutput
from workbench.ops import TARGET_CODES
from workbench.specs import SteeringSpec
from workbench.steer_model import RequestResult, SteerModel

__all__ = ["VLLMSteerModel", "VLLMSteeringConfig"]


class VLLMSteerModel(SteerModel):
    """A vLLM engine with per-layer steering and activation capture.

    Args:
        cfg: engine settings (default: the embedded model).
        bootstrap_layers: accepted for compatibility with the chatspace API;
            every layer is steerable and capturable from start-up.
        enforce_eager: ``None`` picks the faster mode for the platform (eager on
            CPU, where compiling takes minutes for little gain; CUDA graphs on
            GPUs); ``True``/``False`` are honoured.
        **engine_kwargs: further ``AsyncEngineArgs`` fields.

    Example::

        model = VLLMSteerModel(VLLMSteeringConfig())
        await model.set_layer_vector(4, torch.randn(model.hidden_size) * 8)
        texts = await model.generate("Once upon a time", max_tokens=16)
    """

    def __init__(
        self,
        cfg: VLLMSteeringConfig | None = None,
        bootstrap_layers: Sequence[int] | None = None,
        enforce_eager: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VLLMSteeringConfig()
        if enforce_eager is None:
            enforce_eager = is_cpu_platform()
        self.enforce_eager = enforce_eager
        if cfg.capture_budget_bytes is not None:
            CaptureBudget(cfg.capture_budget_bytes)  # refuse a bad budget before the engine starts
        args = engine_args(cfg, enforce_eager, **engine_kwargs)
        self._model_path = args.model
        self._output = EngineOutput(cfg.log_file)
        try:
            with self._output.attached(), _environment(engine_environment(cfg.model_runner)):
                self._engine = AsyncLLM.from_engine_args(args)
        except Exception as error:
            self._output.drain()
            reason = self._output.failure_reason() or f"{type(error).__name__}: {error}"
            where = f"; the engine's log is in {cfg.log_file}" if cfg.log_file else ""
            raise _start_error(reason)(
                f"the vLLM engine for {cfg.model_name!r} failed to start: {reason}{where}"
            ) from error
        self._link = EngineLink(
            self._engine,
            num_slots=cfg.max_steering_slots,
            rpc_timeout_s=lambda: cfg.rpc_timeout_s,
            failure_reason=self._output.failure_reason,
            restart_hint="start a new VLLMSteerModel, or call workbench.notebook.get_engine() to restart it",
            capture_budget="auto" if cfg.capture_budget_bytes is None else cfg.capture_budget_bytes,
        )
        if bootstrap_layers is not None:
            for layer in bootstrap_layers:
                self._check_layer(layer)

    # -- properties --------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self._link.hidden_size

    @property
    def layer_count(self) -> int:
        return self._link.layer_count

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (and its residual stream holds)."""
        return self._link.dtype

    @property
    def max_model_len(self) -> int:
        return self._link.max_model_len

    @property
    def model_name(self) -> str:
        """The name or path the engine loaded (the converted checkpoint for the embedded model)."""
        return self._model_path

    @property
    def model_id(self) -> str:
        return self.cfg.model_name

    @property
    def tokenizer(self) -> Any:
        return self._engine.get_tokenizer()

    @property
    def engine(self) -> Any:
        """The underlying ``vllm.v1.engine.async_llm.AsyncLLM``."""
        return self._engine

    @property
    def is_alive(self) -> bool:
        """Not closed, and the engine's processes are running."""
        return not self._closed and not self._engine.errored

    def engine_log_tail(self) -> list[str]:
        """The last lines the engine processes printed (see ``VLLMSteeringConfig.log_file``)."""
        return self._output.tail()

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_ready(self) -> None:
        if self._closed:
            raise EngineClosedError("this VLLMSteerModel is closed")
        await self._link.ensure_ready()
        self._link.check_alive()

    def close(self) -> None:
        """Shut the engine down; the model refuses further use."""
        if not self._closed:
            self._closed = True
            self._engine.shutdown()
            self._link.close()

    async def __aenter__(self) -> VLLMSteerModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- generation --------------------------------------------------------

    def _resolve_sampling(self, sampling_params: Any, sampling_kwargs: Mapping[str, Any], **defaults: Any) -> Any:
        return resolve_sampling(sampling_params, sampling_kwargs, **defaults)

    def _sample_count(self, params: Any) -> int:
        return params.n

    async def _run_request(
        self,
        token_ids: list[int],
        params: Any,
        spec: SteeringSpec,
        layers: tuple[int, ...],
        boundaries: tuple[MessageBoundary, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> RequestResult:
        capture = self._link.capture_request(layers, len(token_ids), params.max_tokens) if layers else None
        messages = tuple((b.start, b.end, TARGET_CODES[b.role]) for b in boundaries) if spec.needs_messages else ()
        run = SteeredRun(request_id=f"wb-{uuid.uuid4().hex}", spec=spec, capture=capture, messages=messages)
        async for output in self._link.stream({"prompt_token_ids": token_ids}, params, run):
            if on_text is not None:
                on_text(output.outputs[0].text)
        final = run.final
        handle = None
        if capture is not None:
            handle = CaptureHandle(
                request_id=run.request_id,
                capture_id=capture.capture_id,
                layer_indices=layers,
                prompt_token_ids=tuple(final.prompt_token_ids),
                generated_token_ids=tuple(final.outputs[0].token_ids),
                message_boundaries=boundaries,
            )
            handle._attach(self, weak_callback(self._link, "release_soon"))
        return RequestResult(final.outputs[0].text, final, handle, run.nonfinite_layer)

    def _check_capture_budget(self, token_ids: list[list[int]], params: Any, layers: tuple[int, ...]) -> None:
        """A call's requests each wait for room in the capture budget, but its
        handles come back only once all have finished: a call whose captures
        together may need more than the budget could wait forever, so it is
        refused, as is a request that alone needs more."""
        budget = self._link.budget
        if budget is None:
            return
        sizes = [
            self._link.capture_bytes(self._link.capture_request(layers, len(ids), params.max_tokens))
            for ids in token_ids
        ]
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        budget.check(sizes[largest], f"the capture of prompt {largest} ({len(token_ids[largest])} tokens)")
        budget.check(sum(sizes), f"this call's {len(sizes)} captures together")

    @property
    def capture_budget(self) -> BudgetUse:
        """The capture budget: its limit, the bytes reserved by captures
        running or not fetched yet, and the requests waiting for room."""
        budget = self._link.budget
        if budget is None:
            raise CaptureError("this engine's captures have no budget")
        return budget.use()

    # -- captures ------------------------------------------------------------

    async def fetch_captures_batch(self, handles: Sequence[CaptureHandle]) -> None:
        """Fetch the captured rows of these handles from the workers in one RPC.

        Every handle that comes back whole gets its rows; then
        ``HandleReleasedError`` names the handles the engine does not know
        (already fetched elsewhere, released, another model) and
        ``CaptureError`` those whose rows are incomplete.
        """
        await self._ensure_ready()
        pending = [handle for handle in handles if not handle.is_fetched]
        for handle in pending:
            if handle.is_closed:
                raise HandleReleasedError(f"capture handle {handle.capture_id} was closed")
        if not pending:
            return
        fetched = await self._link.fetch_rows([handle.capture_id for handle in pending])
        # Every handle that came back whole gets its rows, even when others did not.
        incomplete, unknown = [], []
        for handle in pending:
            found = fetched.rows[handle.capture_id]
            if handle.capture_id in fetched.errors:
                incomplete.append(f"capture {handle.capture_id} is incomplete: {fetched.errors[handle.capture_id]}")
            elif not found:
                unknown.append(
                    f"capture {handle.capture_id} is unknown to this engine: already fetched "
                    "elsewhere, released, or from another model"
                )
            else:
                try:
                    handle._set_data({layer: rows[: handle.expected_rows] for layer, rows in found.items()})
                except CaptureError as error:
                    incomplete.append(str(error))
        if unknown:
            raise HandleReleasedError("; ".join(unknown + incomplete))
        if incomplete:
            raise CaptureError("; ".join(incomplete))

    async def logit_lens(self, hidden: Tensor, top_k: int = 5) -> list[list[tuple[int, str, float]]]:
        """The logit lens: for each residual-stream row of ``hidden`` (``[N, H]``,
        e.g. one token's captured rows at several layers), the ``top_k`` most
        probable next tokens read out through the model's own final norm and
        unembedding, as ``(token id, text, probability)``. Computed in the
        workers, where those weights are."""
        rows = hidden.unsqueeze(0) if hidden.ndim == 1 else hidden
        if rows.ndim != 2 or rows.shape[-1] != self.hidden_size:
            raise HiddenSizeError(f"logit_lens needs rows of size {self.hidden_size}, got shape {tuple(hidden.shape)}")
        if not rows.is_floating_point() or not torch.isfinite(rows).all():
            raise SpecError("logit_lens needs finite floating-point rows")
        vocab = self._engine.model_config.get_vocab_size()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise SpecError(f"top_k must be an int in 1..{vocab}, got {top_k!r}")
        await self._ensure_ready()
        replies = await self._link.rpc(wire.Rpc.LOGIT_LENS, wire.encode_rows(rows), top_k)
        reply = next(reply for reply in replies if reply is not None)
        tokenizer = self.tokenizer
        return [
            [(token, tokenizer.decode([token]), prob) for token, prob in zip(ids, probs)]
            for ids, probs in zip(reply["ids"], reply["probs"])
        ]

    async def worker_stats(self) -> list[dict[str, int]]:
        """Per-worker counts of captures held (for leak checks), after the
        workers' queued capture work (writes, releases) has finished."""
        await self._ensure_ready()
        return await self._link.worker_stats()


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set ``variables`` while the engine starts: its processes inherit them,
    and this process's environment is left as it was."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_error(reason: str) -> type[WorkbenchError]:
    """The error class for an engine that failed to start: ours when the workers
    raised one of ours (e.g. ``UnsupportedModelError`` for a model the runtime
    refuses), else ``EngineStartError``."""
    name = reason.split(":", 1)[0].removeprefix("workbench.errors.")
    cls = getattr(errors, name, None)
    if reason.startswith("workbench.errors.") and isinstance(cls, type) and issubclass(cls, WorkbenchError):
        return cls
    return EngineStartError


def resolve_sampling(sampling_params: Any, sampling_kwargs: Mapping[str, Any], **defaults: Any) -> Any:
    """The ``SamplingParams`` of a call: given, or built from keyword arguments
    over ``defaults`` (not both)."""
    if sampling_params is not None and sampling_kwargs:
        raise TypeError(f"pass sampling_params or sampling keyword arguments ({', '.join(sampling_kwargs)}), not both")
    if sampling_params is None:
        return SamplingParams(**{**defaults, **sampling_kwargs})
    if not isinstance(sampling_params, SamplingParams):
        raise TypeError(f"sampling_params must be a vllm.SamplingParams, got {type(sampling_params).__name__}")
    return sampling_params
