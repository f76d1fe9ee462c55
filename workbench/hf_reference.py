"""Hugging Face transformers reference: the same steering ops as forward hooks.

Use it to validate the vLLM runtime (as the tests do): the same model, spec
and prompt must give the same greedy tokens and, in float32, the same
captured residual streams. The hooks call ``workbench.ops``, the code the vLLM
workers run, so the two backends share one implementation of the math.

Example::

    model, tokenizer = load_reference_model()
    result = generate_reference(model, tokenizer("Hi").input_ids, 16, spec, capture_layers=[4])
    result.captures[4]  # [prompt + 16 - 1, hidden]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workbench import ops
from workbench.capture import MessageBoundary
from workbench.embedded import DEFAULT_MODEL_NAME, resolve_model_name
from workbench.errors import SpecError
from workbench.model_layers import decoder_layer_list, layer_count_of
from workbench.specs import LayerSteeringSpec, SteeringSpec


def load_reference_model(
    model_name: str = DEFAULT_MODEL_NAME, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """The Hugging Face model and tokenizer for ``model_name`` (embedded default resolved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def reference_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder layers of a Hugging Face model (found by structure, or at ``path``)."""
    return decoder_layer_list(model, layer_count_of(model.config), path)


def _output_stream(output: Any) -> Tensor:
    # Decoder layers return the residual stream, alone or first in a tuple.
    return output[0] if isinstance(output, tuple) else output


def _replace_stream(output: Any, stream: Tensor) -> Any:
    return (stream, *output[1:]) if isinstance(output, tuple) else stream


def _layer_hook(layer_spec: LayerSteeringSpec, prompt_length: int | None, messages: Sequence[ops.MessageSpan]) -> Any:
    seen = 0  # rows this layer has processed: the positions of the next call's rows start here

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        nonlocal seen
        stream = _output_stream(output)
        rows = stream.shape[-2]

        def vector(tensor: Tensor) -> Tensor:
            # As the engine's tables hold it: in the model's dtype, then computed in float32.
            return tensor.to(device=stream.device, dtype=stream.dtype).float()

        masks = ops.NO_MASKS
        if prompt_length is not None:
            codes = torch.from_numpy(ops.row_codes(np.arange(seen, seen + rows), prompt_length, messages))
            masks = tuple(  # type: ignore[assignment]
                None
                if op is None or op.positions == "all"
                else ops.position_mask(ops.target_code(op.positions), codes.to(stream.device))
                for op in (layer_spec.add, layer_spec.projection_cap, layer_spec.ablation)
            )
        seen += rows
        cap = layer_spec.projection_cap
        ablation = layer_spec.ablation
        steered = ops.apply_layer_ops(
            stream.float(),
            add=vector(layer_spec.add.effect) if layer_spec.add is not None else None,
            cap_direction=None if cap is None else vector(cap.vector),
            cap_min=None if cap is None else cap.min,
            cap_max=None if cap is None else cap.max,
            ablation_direction=None if ablation is None else vector(ablation.vector),
            ablation_scale=1.0 if ablation is None else ablation.scale,
            masks=masks,
        )
        return _replace_stream(output, steered.to(stream.dtype))

    return hook


@contextmanager
def steering_hooks(
    model: nn.Module,
    spec: SteeringSpec,
    prompt_length: int | None = None,
    boundaries: Sequence[MessageBoundary] = (),
) -> Iterator[None]:
    """Apply ``spec`` to ``model``'s decoder layers inside the block.

    This mutates ``model`` (forward hooks) until the block exits. Ops that
    target prompt or generated tokens need ``prompt_length``, ops that target
    chat roles or messages also the chat's ``boundaries``; the hooks then
    count the rows they see, so use one block per sequence (batch size 1).
    """
    layers = reference_layers(model)
    spec.validate_for(model.config.hidden_size, len(layers), next(model.parameters()).dtype)
    targeted = any(op.positions != "all" for layer in spec.layers.values() for _, op in layer.ops())
    if targeted and prompt_length is None:
        raise SpecError("this spec targets prompt or generated tokens; pass prompt_length")
    if spec.needs_messages and not boundaries:
        raise SpecError("this spec targets chat roles or messages; pass the chat's boundaries")
    messages = [(b.start, b.end, ops.TARGET_CODES[b.role]) for b in boundaries]
    handles = [
        layers[index].register_forward_hook(_layer_hook(layer, prompt_length if targeted else None, messages))
        for index, layer in spec.layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_hooks(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, list[Tensor]]]:
    """Record the residual stream after each of ``layers`` (after any steering
    hooks registered before), one tensor per forward call."""
    modules = reference_layers(model)
    records: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def recorder(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            records[layer].append(_output_stream(output)[0].detach().to("cpu", copy=True))

        return hook

    handles = [modules[layer].register_forward_hook(recorder(layer)) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ReferenceResult:
    token_ids: list[int]
    """Generated token ids (the prompt excluded)."""
    captures: dict[int, Tensor]
    """Layer -> ``[prompt + generated - 1, hidden]``, the layout of vLLM captures."""


@torch.no_grad()
def generate_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    spec: SteeringSpec | None = None,
    capture_layers: Sequence[int] = (),
    boundaries: Sequence[MessageBoundary] = (),
) -> ReferenceResult:
    """Greedy generation with ``spec`` applied and ``capture_layers`` recorded
    (``boundaries``: the chat's messages, for ops that target roles or messages)."""
    spec = spec or SteeringSpec()
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], device=device)
    hooks = steering_hooks(model, spec, len(prompt_ids), boundaries)
    with hooks, capture_hooks(model, capture_layers) as records:
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    generated = output[0, input_ids.shape[1] :].tolist()
    return ReferenceResult(
        token_ids=generated,
        captures={layer: torch.cat(chunks) for layer, chunks in records.items()},
    )


@torch.no_grad()
def forward_reference(
    model: nn.Module,
    token_ids: Sequence[int],
    spec: SteeringSpec | None = None,
    capture_layers: Sequence[int] = (),
    prompt_length: int | None = None,
    boundaries: Sequence[MessageBoundary] = (),
) -> dict[int, Tensor]:
    """One teacher-forced forward over ``token_ids``: layer -> ``[len, hidden]``
    residual stream (``prompt_length`` marks where generated tokens start)."""
    device = next(model.parameters()).device
    hooks = steering_hooks(model, spec or SteeringSpec(), prompt_length, boundaries)
    with hooks, capture_hooks(model, capture_layers) as records:
        model(torch.tensor([list(token_ids)], device=device))
    return {layer: chunks[0] for layer, chunks in records.items()}
