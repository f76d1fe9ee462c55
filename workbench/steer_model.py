"""What every steerable model offers, wherever its engine runs.

``SteerModel`` is the API that ``VLLMSteerModel`` (an engine in your process)
and ``RemoteSteerModel`` (a ``workbench serve`` server) share, written once:
the steering state and its setters, the checks of specs, layers and prompts
against the model, and ``generate`` / ``chat`` / ``sweep`` down to the point
where one tokenised request runs. Subclasses run that request
(``_run_request``), fetch captures, and say how sampling is given.

Steering state is a value (a ``SteeringSpec``): each request snapshots the
state current when it is submitted (or takes its own ``steering_spec=``), so
setters neither wait for nor alter requests in flight.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workbench.capture import CaptureHandle, MessageBoundary
from workbench.chat import ChatResponse, format_conversation, split_conversations
from workbench.completion import Completion
from workbench.errors import CaptureError, PromptError, SpecError, WorkbenchError
from workbench.specs import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec, check_layer_index

if TYPE_CHECKING:
    from workbench.extract import Positions
    from workbench.extract_reader import ActivationReader

Prompts = str | Sequence[int] | Sequence[str | Sequence[int]]
Specs = SteeringSpec | Sequence[SteeringSpec | None] | None
TextCallback = Callable[[int, str], None]
"""``on_text(index, text)``: prompt ``index`` has generated ``text`` so far."""


@dataclass
class RequestResult:
    """One finished request, as ``_run_request`` returns it."""

    text: str
    raw: Any
    """The backend's own record of it (vLLM's ``RequestOutput``, or the server's JSON reply)."""
    handle: CaptureHandle | None = None
    nonfinite_layer: int | None = None


class SteerModel(abc.ABC):
    """Per-layer steering and activation capture over some engine; see ``VLLMSteerModel``."""

    def __init__(self) -> None:
        self._spec = SteeringSpec()
        self._stack: list[SteeringSpec] = []
        self._target_layer: int | None = None
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    # -- what a backend provides --------------------------------------------

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def layer_count(self) -> int: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (and its residual stream holds)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any: ...

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """The name the model goes by (``VLLMSteeringConfig.model_name``, or a server's served model name)."""

    @abc.abstractmethod
    async def _ensure_ready(self) -> None:
        """Raise if the model cannot run requests (closed, dead); set up what the first request needs."""

    @abc.abstractmethod
    def _resolve_sampling(self, sampling_params: Any, sampling_kwargs: Mapping[str, Any], **defaults: Any) -> Any:
        """The sampling of a call: ``sampling_params``, or built from keywords
        over ``defaults`` (not both)."""

    @abc.abstractmethod
    def _sample_count(self, params: Any) -> int:
        """How many completions per prompt ``params`` asks for (``n``)."""

    @abc.abstractmethod
    async def _run_request(
        self,
        token_ids: list[int],
        params: Any,
        spec: SteeringSpec,
        layers: tuple[int, ...],
        boundaries: tuple[MessageBoundary, ...],
        on_text: Callable[[str], None] | None = None,
    ) -> RequestResult:
        """Run one tokenised prompt with ``spec``, capturing ``layers`` (none: ``()``);
        ``on_text(text so far)`` as the text grows, where the backend streams."""

    @abc.abstractmethod
    async def fetch_captures_batch(self, handles: Sequence[CaptureHandle]) -> None:
        """Fetch the captured rows of these handles (one round trip where the backend allows)."""

    def _check_capture_budget(self, token_ids: list[list[int]], params: Any, layers: tuple[int, ...]) -> None:
        """Raise ``CaptureBudgetError`` for a call whose captures can never fit
        the backend's capture budget (none by default)."""
        return None

    # -- validation ----------------------------------------------------------

    def _check_layer(self, layer: Any) -> int:
        return check_layer_index(layer, self.layer_count)

    def _check_spec(self, spec: Any) -> SteeringSpec:
        if not isinstance(spec, SteeringSpec):
            raise SpecError(f"expected a SteeringSpec, got {type(spec).__name__}")
        spec.validate_for(self.hidden_size, self.layer_count, self.dtype)
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

    def _per_request_specs(self, steering_spec: Specs, count: int) -> list[SteeringSpec]:
        current = self._spec
        if steering_spec is None or isinstance(steering_spec, SteeringSpec):
            return [self._check_spec(steering_spec or current)] * count
        specs = list(steering_spec)
        if len(specs) != count:
            raise SpecError(f"got {len(specs)} steering specs for {count} prompts")
        return [self._check_spec(current if spec is None else spec) for spec in specs]

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

    # -- generation ------------------------------------------------------------

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
        ``Completion``s (strings; the backend's raw records with
        ``raw_output=True``), or ``(texts, handles)`` when ``capture_layers``
        is given.

        ``on_text(index, text)`` streams: it is called on the event loop each
        time prompt ``index``'s text grows, with its text so far (keep it
        quick; what it raises fails the call). Cancelling the task awaiting
        ``generate`` aborts its requests.
        """
        params = self._resolve_sampling(sampling_params, sampling_kwargs)
        token_ids = self._tokenize_prompts(prompts)
        specs = self._per_request_specs(steering_spec, len(token_ids))
        results = await self._run_prompts(token_ids, params, capture_layers, specs, on_text=on_text)
        texts = [result.raw if raw_output else Completion(result.text, result.nonfinite_layer) for result in results]
        if capture_layers is None:
            return texts
        return texts, [result.handle for result in results if result.handle is not None]

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
        (the raw records with ``raw_output=True``), or ``(responses,
        handles)`` with ``capture_layers``; handles carry ``message_boundaries``.
        """
        params = self._resolve_sampling(sampling_params, sampling_kwargs)
        conversations, _ = split_conversations(messages)
        specs = self._per_request_specs(steering_spec, len(conversations))
        # Boundaries for captures (per-message rows) and for ops that target roles or messages.
        with_boundaries = capture_layers is not None or any(spec.needs_messages for spec in specs)
        tokenizer = self.tokenizer
        formatted = [
            format_conversation(tokenizer, conversation, chat_options, with_boundaries=with_boundaries)
            for conversation in conversations
        ]
        results = await self._run_prompts(
            [f.token_ids for f in formatted],
            params,
            capture_layers,
            specs,
            [f.boundaries for f in formatted],
            on_text=on_text,
        )
        if raw_output:
            responses: list[Any] = [result.raw for result in results]
        else:
            responses = [
                ChatResponse(result.text, f.prefill, result.nonfinite_layer) for result, f in zip(results, formatted)
            ]
        if capture_layers is None:
            return responses
        return responses, [result.handle for result in results if result.handle is not None]

    async def _run_prompts(
        self,
        token_ids: list[list[int]],
        params: Any,
        capture_layers: Sequence[int] | int | None,
        specs: list[SteeringSpec],
        boundaries: Sequence[tuple[MessageBoundary, ...]] | None = None,
        on_text: TextCallback | None = None,
    ) -> list[RequestResult]:
        """Check a call's prompts and captures, then run its requests (one checked
        spec each, from ``_per_request_specs``) concurrently."""
        await self._ensure_ready()
        layers = self._capture_layers(capture_layers)
        if layers and self._sample_count(params) != 1:
            raise CaptureError(f"capture needs SamplingParams.n == 1, got n={self._sample_count(params)}")
        if boundaries is None and any(spec.needs_messages for spec in specs):
            raise SpecError(
                "this steering targets chat roles or messages (positions='user', a message index, ...): "
                "they exist in chat() requests, not in generate()"
            )
        for i, ids in enumerate(token_ids):
            if len(ids) >= self.max_model_len:
                raise PromptError(f"prompt {i} has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        boundaries = boundaries or [()] * len(token_ids)
        if layers:
            self._check_capture_budget(token_ids, params, layers)
        return list(
            await asyncio.gather(
                *(
                    self._run_request(ids, params, spec, layers, bounds, _text_of(on_text, index))
                    for index, (ids, spec, bounds) in enumerate(zip(token_ids, specs, boundaries))
                )
            )
        )

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

    async def extract(
        self,
        prompts: Sequence[Any],
        layers: Sequence[int] | int,
        out_dir: str | os.PathLike[str],
        *,
        positions: Positions = "all",
        sampling_params: Any = None,
        steering_spec: Specs = None,
        chat_options: Mapping[str, Any] | None = None,
        shard_bytes: int | None = None,
        max_in_flight: int | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> ActivationReader:
        """Capture ``layers`` for every prompt (text, token ids or a
        conversation) and stream the rows at ``positions`` (``"all"``,
        ``"prompt"``, ``"generated"``, ``"last"``) into sharded safetensors
        files in ``out_dir``, with a JSON index; returns its
        ``ActivationReader``.

        Sampling defaults to greedy with 16 tokens. At most ``max_in_flight``
        requests (default 64) run or wait to be fetched at once; a shard is
        written once it holds ``shard_bytes`` (default 256 MiB) of rows. Run
        again on the same folder with the same prompts and settings to
        resume: finished shards are kept, the other prompts redone; other
        prompts or settings raise ``ExtractError`` unless ``overwrite``.
        """
        from workbench.extract import DEFAULT_MAX_IN_FLIGHT, DEFAULT_SHARD_BYTES, extract

        return await extract(
            self,
            prompts,
            layers,
            out_dir,
            positions=positions,
            sampling_params=sampling_params,
            steering_spec=steering_spec,
            chat_options=chat_options,
            shard_bytes=DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
            progress=progress,
            overwrite=overwrite,
        )

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


def _text_of(on_text: TextCallback | None, index: int) -> Callable[[str], None] | None:
    """``on_text`` bound to one prompt's index."""
    if on_text is None:
        return None
    return lambda text: on_text(index, text)
