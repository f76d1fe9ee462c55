"""The client API: ``VLLMSteerModel`` over vLLM's ``AsyncLLM``.

No tensor math here: specs are validated and encoded, requests are tagged
with their steering slot and capture (``workbench.wire``), and captured rows
are fetched from the workers. Steering state is a value (a
``SteeringSpec``): each request snapshots the state current when it is
submitted (or takes its own ``steering_spec=``), so setters neither wait
for nor alter requests in flight.

vLLM is imported with this module, not inside a call: importing it keeps
some exceptions it caught, whose tracebacks would hold the importing call's
frame (and so the model being built) alive after ``del model``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from workbench import transfer, wire
from workbench.capture import CaptureHandle, MessageBoundary
from workbench.chat import ChatResponse, format_conversation, split_conversations
from workbench.completion import Completion
from workbench.config import VLLMSteeringConfig, engine_args, is_cpu_platform
from workbench.errors import (
    CaptureError,
    EngineClosedError,
    EngineDeadError,
    EngineStartError,
    HandleReleasedError,
    PromptError,
    SpecError,
    WorkbenchError,
    WorkerTimeoutError,
)
from workbench.logs import EngineOutput
from workbench.slots import SlotTable
from workbench.specs import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec, check_layer_index

__all__ = ["VLLMSteerModel", "VLLMSteeringConfig"]

logger = logging.getLogger(__name__)

ENGINE_POLL_S = 0.5
"""How often a pending worker call checks whether the engine has died."""

Prompts = str | Sequence[int] | Sequence[str | Sequence[int]]
Specs = SteeringSpec | Sequence[SteeringSpec | None] | None
TextCallback = Callable[[int, str], None]
"""``on_text(index, text)``: prompt ``index`` has generated ``text`` so far."""


class VLLMSteerModel:
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
        self.cfg = cfg = cfg or VLLMSteeringConfig()
        # vLLM reads these when it starts its engine processes, which inherit them.
        for key, value in wire.ENGINE_ENV.items():
            if os.environ.get(key, value) != value:
                logger.warning("workbench needs %s=%s (was %s); overriding", key, value, os.environ[key])
            os.environ[key] = value
        for key, value in wire.ENGINE_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if enforce_eager is None:
            enforce_eager = is_cpu_platform()
        self.enforce_eager = enforce_eager
        args = engine_args(cfg, enforce_eager, **engine_kwargs)
        self._model_path = args.model
        self._output = EngineOutput(cfg.log_file)
        try:
            with self._output.attached():
                self._engine = AsyncLLM.from_engine_args(args)
        except Exception as error:
            self._output.drain()
            reason = self._output.failure_reason() or f"{type(error).__name__}: {error}"
            where = f"; the engine's log is in {cfg.log_file}" if cfg.log_file else ""
            raise EngineStartError(
                f"the vLLM engine for {cfg.model_name!r} failed to start: {reason}{where}"
            ) from error
        model_config = self._engine.model_config
        self._hidden_size = model_config.get_hidden_size()
        self._layer_count = model_config.get_total_num_hidden_layers()
        self._dtype: torch.dtype = model_config.dtype
        self._prefix_caching = bool(self._engine.vllm_config.cache_config.enable_prefix_caching)
        self._spec = SteeringSpec()
        self._stack: list[SteeringSpec] = []
        self._target_layer: int | None = None
        self._slots = SlotTable(cfg.max_steering_slots, self._load_slot)
        self._setup_done = False
        self._setup_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_items: dict[str, dict[str, None]] = {}
        """Worker method -> items queued for it in this turn of the event loop (releases, recycled files)."""
        self._pending_loads: list[tuple[int, dict[str, Any], asyncio.Future[None]]] = []
        self._pending_nonfinite: dict[str, asyncio.Future[int | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handoff = wire.make_handoff_folder()
        self._handoff_folder: str | None = self._handoff.name
        """Where workers write capture files (if they cannot see it, rows come inline in the fetch reply)."""
        self._closed = False
        if bootstrap_layers is not None:
            for layer in bootstrap_layers:
                self._check_layer(layer)

    # -- properties --------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def layer_count(self) -> int:
        return self._layer_count

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (and its residual stream holds)."""
        return self._dtype

    @property
    def model_name(self) -> str:
        """The name or path the engine loaded (the converted checkpoint for the embedded model)."""
        return self._model_path

    @property
    def tokenizer(self) -> Any:
        return self._engine.get_tokenizer()

    @property
    def engine(self) -> Any:
        """The underlying ``vllm.v1.engine.async_llm.AsyncLLM``."""
        return self._engine

    @property
    def is_closed(self) -> bool:
        return self._closed

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
        if self._setup_done:
            return
        async with self._setup_lock:
            if not self._setup_done:
                self._loop = asyncio.get_running_loop()
                await self._rpc(wire.Rpc.SETUP)
                self._setup_done = True

    def close(self) -> None:
        """Shut the engine down; the model refuses further use."""
        if not self._closed:
            self._closed = True
            self._engine.shutdown()
            self._handoff.cleanup()

    async def __aenter__(self) -> VLLMSteerModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- validation --------------------------------------------------------

    def _check_layer(self, layer: Any) -> int:
        return check_layer_index(layer, self._layer_count)

    def _check_spec(self, spec: Any) -> SteeringSpec:
        if not isinstance(spec, SteeringSpec):
            raise SpecError(f"expected a SteeringSpec, got {type(spec).__name__}")
        spec.validate_for(self._hidden_size, self._layer_count, self._dtype)
        return spec

    def _capture_layers(self, capture_layers: Sequence[int] | int | None) -> tuple[int, ...]:
        if capture_layers is None:
            return ()
        if isinstance(capture_layers, int):
            capture_layers = [capture_layers]
        layers = tuple(sorted({self._check_layer(layer) for layer in capture_layers}))
        if not layers:
            raise CaptureError("capture_layers is empty; pass None to capture nothing")
        return layers

    # -- generation --------------------------------------------------------

    async def generate(
        self,
        prompts: Prompts,
        sampling_params: Any = None,
        *,
        capture_layers: Sequence[int] | int | None = None,
        steering_spec: Specs = None,
        raw_output: bool = False,
        on_text: TextCallback | None = None,
        **sampling_kwargs: Any,
    ) -> list[Any] | tuple[list[Any], list[CaptureHandle]]:
        """Generate one completion per prompt (a string or a list of token ids).

        Sampling comes from ``sampling_params`` or from keyword arguments
        (``temperature=``, ``max_tokens=``, ...), not both.
        ``steering_spec`` is one spec for every prompt or a list with one per
        prompt (``None`` entries use the current steering state). Returns
        ``Completion``s (strings; vLLM ``RequestOutput``s with
        ``raw_output=True``), or ``(texts, handles)`` when ``capture_layers``
        is given.

        ``on_text(index, text)`` streams: it is called on the event loop after
        each engine step that advanced prompt ``index``, with its text so far
        (keep it quick; what it raises fails the call). Cancelling the task
        awaiting ``generate`` aborts its requests in the engine.
        """
        params = resolve_sampling(sampling_params, sampling_kwargs)
        token_ids = self._tokenize_prompts(prompts)
        outputs = await self._generate_tokens(token_ids, params, capture_layers, steering_spec, on_text=on_text)
        texts = [output if raw_output else Completion(output.outputs[0].text, broken) for output, _, broken in outputs]
        if capture_layers is None:
            return texts
        return texts, [handle for _, handle, _ in outputs if handle is not None]

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: Any = None,
        *,
        capture_layers: Sequence[int] | int | None = None,
        steering_spec: Specs = None,
        raw_output: bool = False,
        chat_options: Mapping[str, Any] | None = None,
        on_text: TextCallback | None = None,
        **sampling_kwargs: Any,
    ) -> list[Any] | tuple[list[Any], list[CaptureHandle]]:
        """Reply to one conversation (a list of ``{"role", "content"}`` dicts) or a batch of them.

        Takes what ``generate`` takes, plus ``chat_options`` for the chat
        template (``add_generation_prompt``, ``continue_final_message`` for an
        assistant prefill, ``chat_template``, ...); ``on_text`` streams the
        generated text (without the prefill) as in ``generate``. Returns ``ChatResponse``s
        (vLLM ``RequestOutput``s with ``raw_output=True``), or ``(responses,
        handles)`` with ``capture_layers``; handles carry ``message_boundaries``.
        """
        params = resolve_sampling(sampling_params, sampling_kwargs)
        conversations, _ = split_conversations(messages)
        tokenizer = self.tokenizer
        formatted = [
            format_conversation(tokenizer, conversation, chat_options, with_boundaries=capture_layers is not None)
            for conversation in conversations
        ]
        outputs = await self._generate_tokens(
            [f.token_ids for f in formatted],
            params,
            capture_layers,
            steering_spec,
            [f.boundaries for f in formatted],
            on_text=on_text,
        )
        if raw_output:
            responses: list[Any] = [output for output, _, _ in outputs]
        else:
            responses = [
                ChatResponse(output.outputs[0].text, f.prefill, broken)
                for (output, _, broken), f in zip(outputs, formatted)
            ]
        if capture_layers is None:
            return responses
        return responses, [handle for _, handle, _ in outputs if handle is not None]

    def _tokenize_prompts(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompt_list = list(prompts)
        if not prompt_list:
            raise PromptError("prompts is empty")
        token_ids = []
        for i, prompt in enumerate(prompt_list):
            if isinstance(prompt, str):
                token_ids.append(self.tokenizer(prompt).input_ids)
            elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
                token_ids.append(list(prompt))
            else:
                raise PromptError(f"prompts[{i}] must be a str or a non-empty list of token ids, got {prompt!r:.80}")
        return token_ids

    async def _generate_tokens(
        self,
        token_ids: list[list[int]],
        params: Any,
        capture_layers: Sequence[int] | int | None,
        steering_spec: Specs,
        boundaries: Sequence[tuple[MessageBoundary, ...]] | None = None,
        on_text: TextCallback | None = None,
    ) -> list[tuple[Any, CaptureHandle | None, int | None]]:
        """Run tokenised prompts; returns vLLM ``RequestOutput``s with their
        capture handles and the layer where steering broke the stream, if it did."""
        await self._ensure_ready()
        self._check_alive()
        layers = self._capture_layers(capture_layers)
        if layers and params.n != 1:
            raise CaptureError(f"capture needs SamplingParams.n == 1, got n={params.n}")
        specs = self._per_request_specs(steering_spec, len(token_ids))
        for i, ids in enumerate(token_ids):
            if len(ids) >= self.cfg.max_model_len:
                raise PromptError(f"prompt {i} has {len(ids)} tokens; max_model_len is {self.cfg.max_model_len}")
        boundaries = boundaries or [()] * len(token_ids)
        return list(
            await asyncio.gather(
                *(
                    self._run_request(ids, params, spec, layers, bounds, _text_of(on_text, index))
                    for index, (ids, spec, bounds) in enumerate(zip(token_ids, specs, boundaries))
                )
            )
        )

    def _per_request_specs(self, steering_spec: Specs, count: int) -> list[SteeringSpec]:
        current = self._spec
        if steering_spec is None or isinstance(steering_spec, SteeringSpec):
            return [self._check_spec(steering_spec or current)] * count
        specs = list(steering_spec)
        if len(specs) != count:
            raise SpecError(f"got {len(specs)} steering specs for {count} prompts")
        return [self._check_spec(current if spec is None else spec) for spec in specs]

    async def _run_request(
        self,
        token_ids: list[int],
        params: Any,
        spec: SteeringSpec,
        layers: tuple[int, ...],
        boundaries: tuple[MessageBoundary, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[Any, CaptureHandle | None, int | None]:
        capture_id = uuid.uuid4().hex if layers else None
        request_id = f"wb-{uuid.uuid4().hex}"
        steered = not spec.is_empty()
        slot = await self._slots.acquire(spec)
        try:
            capture = None
            if capture_id is not None:
                capacity = self._capture_capacity(len(token_ids), params)
                capture = wire.CaptureRequest(capture_id, layers, capacity, self._handoff_folder)
            payload = wire.RequestPayload(slot=slot, tag=request_id if steered else None, capture=capture)
            request_params = params.clone()
            request_params.extra_args = payload.to_extra_args(params.extra_args)
            if layers:
                # Cached prefix blocks are never recomputed, so their rows would be missing.
                request_params.skip_reading_prefix_cache = True
            prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
            if self._prefix_caching and steered:
                # KV blocks computed under one steering must not serve another.
                prompt["cache_salt"] = spec.fingerprint
            final = None
            async for output in self._engine.generate(prompt, request_params, request_id):
                final = output
                if on_text is not None:
                    on_text(output.outputs[0].text)
        except BaseException:
            if capture_id is not None:
                self._release_soon(capture_id)
            raise
        finally:
            await self._slots.release(slot)
        broken = await self._nonfinite_layer(request_id) if steered else None
        if broken is not None:
            logger.warning(
                "steering broke the residual stream of request %s at layer %d (inf, NaN, or too large for "
                "the next layer's norm); its text is not the model's: lower the scale there",
                request_id,
                broken,
            )
        handle = None
        if capture_id is not None:
            handle = CaptureHandle(
                request_id=request_id,
                capture_id=capture_id,
                layer_indices=layers,
                prompt_token_ids=tuple(final.prompt_token_ids),
                generated_token_ids=tuple(final.outputs[0].token_ids),
                message_boundaries=boundaries,
            )
            handle._attach(self, _weak_callback(self, "_release_soon"))
        return final, handle, broken

    def _capture_capacity(self, prompt_tokens: int, params: Any) -> int:
        """Rows a request can produce: every token it can hold but the last sampled one."""
        limit = self.cfg.max_model_len
        return min(prompt_tokens + (params.max_tokens or limit), limit) - 1

    async def _nonfinite_layer(self, tag: str) -> int | None:
        """Where steering broke this finished request's stream (``Rpc.TAKE_NONFINITE``),
        asked together with the other requests finishing in this turn of the event loop."""
        future = asyncio.get_running_loop().create_future()
        if not self._pending_nonfinite:
            self._track(asyncio.ensure_future(self._flush_nonfinite()))
        self._pending_nonfinite[tag] = future
        return await future

    async def _flush_nonfinite(self) -> None:
        await asyncio.sleep(0)
        pending, self._pending_nonfinite = self._pending_nonfinite, {}
        try:
            replies = await self._rpc(wire.Rpc.TAKE_NONFINITE, list(pending))
        except BaseException as error:
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        found = {tag: layer for reply in replies for tag, layer in reply.items()}
        for tag, future in pending.items():
            if not future.done():
                future.set_result(found.get(tag))

    async def _load_slot(self, slot: int, spec: SteeringSpec) -> None:
        """Load ``spec`` into ``slot`` in the workers. Loads asked for in the same
        turn of the event loop (a batch of per-request specs) go in one worker
        call: each call pauses the engine between two steps, and a request
        starts only once its slot is loaded, so one call per spec made a
        64-spec batch start request by request."""
        future = asyncio.get_running_loop().create_future()
        if not self._pending_loads:
            self._track(asyncio.ensure_future(self._flush_loads()))
        self._pending_loads.append((slot, wire.encode_spec(spec), future))
        await future

    async def _flush_loads(self) -> None:
        await asyncio.sleep(0)
        loads, self._pending_loads = self._pending_loads, []
        try:
            await self._rpc(wire.Rpc.LOAD_SLOTS, [(slot, payload) for slot, payload, _ in loads])
        except BaseException as error:
            for *_, future in loads:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            for *_, future in loads:
                if not future.done():
                    future.set_result(None)

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to a background task until it finishes."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        layer: int,
        vector: Any,
        scales: Sequence[float],
        sampling_params: Any = None,
        **options: Any,
    ) -> Any:
        """Run ``prompt`` (or a conversation) once per scale of ``vector`` at
        ``layer``, all in one batch; returns a pandas DataFrame. Keyword
        options are those of ``workbench.sweep.run_sweep`` (op, positions,
        base_spec, ...) and sampling keywords as in ``generate``
        (``max_tokens=``, ``temperature=``, ...)."""
        from workbench.sweep import run_sweep

        self._check_layer(layer)
        return await run_sweep(self, prompt, layer, vector, scales, sampling_params, **options)

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
        replies = await self._rpc(wire.Rpc.FETCH_CAPTURES, [handle.capture_id for handle in pending])
        layers: dict[str, dict[int, Tensor]] = {handle.capture_id: {} for handle in pending}
        errors: dict[str, str] = {}
        recycle = _weak_callback(self, "_recycle_soon", _delete_file)
        for wire_reply in replies:
            reply = wire.FetchReply.from_wire(wire_reply)
            for (capture_id, layer), tensor in transfer.read_reply(reply, self._hidden_size, recycle).items():
                layers[capture_id][layer] = tensor
            errors.update(reply.errors)
        # Every handle that came back whole gets its rows, even when others did not.
        incomplete, unknown = [], []
        for handle in pending:
            found = layers[handle.capture_id]
            if handle.capture_id in errors:
                incomplete.append(f"capture {handle.capture_id} is incomplete: {errors[handle.capture_id]}")
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

    def _release_soon(self, capture_id: str) -> None:
        """Free a capture in the workers; safe to call from any thread or a finaliser."""
        self._send_soon(wire.Rpc.RELEASE_CAPTURES, capture_id)

    def _recycle_soon(self, path: str) -> None:
        """Give a fetched capture's file back to the workers for later captures
        (called once no tensor views it); deleted instead once the engine is gone."""
        if not self._send_soon(wire.Rpc.RECYCLE_CAPTURE_FILES, path):
            _delete_file(path)

    def _send_soon(self, method: str, item: str) -> bool:
        """Pass ``item`` to the workers' ``method`` with the others queued in the
        same turn of the event loop, in one call; safe from any thread or a
        finaliser. False once the engine is closed."""
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            return False
        loop.call_soon_threadsafe(self._queue_item, method, item)
        return True

    def _queue_item(self, method: str, item: str) -> None:
        pending = self._pending_items.setdefault(method, {})
        if not pending:
            self._track(asyncio.ensure_future(self._flush_items(method)))
        pending[item] = None

    async def _flush_items(self, method: str) -> None:
        await asyncio.sleep(0)
        items = list(self._pending_items.pop(method, {}))
        if items and not self._closed:
            try:
                await self._rpc(method, items)
            except Exception:  # the engine is gone; its memory went with it
                logger.warning("%s: could not pass %d items to the workers", method, len(items), exc_info=True)

    async def worker_stats(self) -> list[dict[str, int]]:
        """Per-worker counts of captures held (for leak checks), after the
        workers' queued capture work (writes, releases) has finished."""
        await self._ensure_ready()
        return await self._rpc(wire.Rpc.STATS)

    def _check_alive(self) -> None:
        if self._engine.errored:
            reason = self._output.failure_reason()
            raise EngineDeadError(
                "the vLLM engine's processes died"
                + (f" ({reason})" if reason else "")
                + "; start a new VLLMSteerModel, or call workbench.notebook.get_engine() to restart it"
            )

    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker. Raises ``EngineDeadError`` as soon as
        the engine dies (vLLM leaves such a call pending) and
        ``WorkerTimeoutError`` after ``cfg.rpc_timeout_s``, instead of waiting forever."""
        self._check_alive()
        call = asyncio.ensure_future(self._engine.collective_rpc(method, args=args))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.rpc_timeout_s
        while not call.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                call.cancel()
                raise WorkerTimeoutError(
                    f"worker call {method!r} got no answer within {self.cfg.rpc_timeout_s} s (rpc_timeout_s)"
                )
            await asyncio.wait({call}, timeout=min(remaining, ENGINE_POLL_S))
            if not call.done() and self._engine.errored:
                call.cancel()
                self._check_alive()
        return call.result()

    # -- steering state --------------------------------------------------------

    def export_steering_spec(self) -> SteeringSpec:
        """The current steering state (an immutable value)."""
        return self._spec

    async def apply_steering_spec(self, spec: SteeringSpec) -> None:
        """Replace the whole steering state at once."""
        self._spec = self._check_spec(spec)

    async def _set_layer(self, layer: int, **ops: Any) -> None:
        self._check_layer(layer)
        await self.apply_steering_spec(self._spec.with_layer(layer, **ops))

    async def set_layer_vector(self, layer_idx: int, vector: Any, *, scale: float = 1.0) -> None:
        """Add ``vector * scale`` to the residual stream after layer ``layer_idx``."""
        await self._set_layer(layer_idx, add=AddSpec(vector=vector, scale=scale))

    def set_target_layer(self, layer_idx: int) -> None:
        """Choose the layer that ``set_vector`` steers."""
        self._target_layer = self._check_layer(layer_idx)

    async def set_vector(self, vector: Any, *, scale: float = 1.0) -> None:
        """``set_layer_vector`` on the layer chosen with ``set_target_layer``."""
        if self._target_layer is None:
            raise WorkbenchError("no target layer; call set_target_layer(layer) first")
        await self.set_layer_vector(self._target_layer, vector, scale=scale)

    async def clear_layer_vector(self, layer_idx: int) -> None:
        await self._set_layer(layer_idx, add=None)

    async def set_layer_projection_cap(
        self, layer_idx: int, vector: Any, *, min: float | None = None, max: float | None = None
    ) -> None:
        """Clamp the projection on ``vector`` (normalised) after layer ``layer_idx`` to ``[min, max]``."""
        await self._set_layer(layer_idx, projection_cap=ProjectionCapSpec(vector=vector, min=min, max=max))

    async def clear_layer_projection_cap(self, layer_idx: int) -> None:
        await self._set_layer(layer_idx, projection_cap=None)

    async def set_layer_ablation(self, layer_idx: int, vector: Any, *, scale: float = 0.0) -> None:
        """Scale the component along ``vector`` (normalised) after layer ``layer_idx``."""
        await self._set_layer(layer_idx, ablation=AblationSpec(vector=vector, scale=scale))

    async def clear_layer_ablation(self, layer_idx: int) -> None:
        await self._set_layer(layer_idx, ablation=None)

    async def clear_all_vectors(self) -> None:
        """Remove all steering (every op on every layer)."""
        self._spec = SteeringSpec()

    async def push_steering_spec(self, spec: SteeringSpec | None = None) -> None:
        """Save the current state on a stack, then apply ``spec`` if given."""
        if spec is not None:
            self._check_spec(spec)
        self._stack.append(self._spec)
        if spec is not None:
            self._spec = spec

    async def pop_steering_spec(self) -> SteeringSpec:
        """Restore the state saved by the last ``push_steering_spec``; returns the state it replaces."""
        if not self._stack:
            raise WorkbenchError("pop_steering_spec: the steering stack is empty")
        replaced, self._spec = self._spec, self._stack.pop()
        return replaced

    @contextlib.asynccontextmanager
    async def steering(self, spec: SteeringSpec) -> AsyncIterator[SteeringSpec]:
        """Apply ``spec`` inside the block and restore the previous state after it."""
        await self.push_steering_spec(spec)
        try:
            yield spec
        finally:
            await self.pop_steering_spec()


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


def _text_of(on_text: TextCallback | None, index: int) -> Callable[[str], None] | None:
    """``on_text`` bound to one prompt's index."""
    if on_text is None:
        return None
    return lambda text: on_text(index, text)


def _weak_callback(
    model: VLLMSteerModel, method: str, orphaned: Callable[[str], None] | None = None
) -> Callable[[str], None]:
    """``model.<method>(item)`` as a callback that does not keep the model alive
    (for finalisers); ``orphaned(item)`` runs instead once the model is gone."""
    ref = weakref.ref(model)

    def call(item: str) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(item)
        elif orphaned is not None:
            orphaned(item)

    return call


def _delete_file(path: str) -> None:
    Path(path).unlink(missing_ok=True)
