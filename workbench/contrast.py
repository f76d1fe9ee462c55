"""Steering vectors from contrasts.

Give paired positive and negative prompts (or conversations); each is run
with capture on, reduced to one vector per layer (see ``TOKEN_REDUCTIONS``),
and the pairs give a direction per layer:

- ``mean_diff``: mean of the positive vectors minus mean of the negative ones.
- ``pca``: first principal component of the paired differences (top right
  singular vector, not centred, so a consistent shift counts as signal),
  signed to agree with the mean difference and scaled to the mean
  projection of the differences on it, so both methods give comparable norms.

The math (``difference_of_means``, ``first_principal_component``) is pure and
tested on synthetic activations; ``extract_contrast_vectors`` runs the model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from workbench.capture import CaptureHandle
from workbench.errors import CaptureError, SpecError
from workbench.specs import AddSpec

if TYPE_CHECKING:
    from workbench.steer_model import SteerModel

METHODS = ("mean_diff", "pca")
TOKEN_REDUCTIONS = ("last_prompt", "prompt_mean", "message_mean", "generated_mean")
"""Which rows of a capture stand for one example: the last prompt token, the
mean over the prompt, the mean over the last message (conversations; the
whole prompt for plain prompts), or the mean over the generated tokens."""


def difference_of_means(positive: Tensor, negative: Tensor) -> Tensor:
    """``mean(positive) - mean(negative)`` over rows (``[N, H]``, ``[M, H]`` -> ``[H]``)."""
    return positive.float().mean(dim=0) - negative.float().mean(dim=0)


def first_principal_component(differences: Tensor) -> Tensor:
    """Top principal direction of paired differences ``[N, H]``, signed and scaled
    as described in the module docstring."""
    differences = differences.float()
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    direction = vh[0]
    mean = differences.mean(dim=0)
    if torch.dot(direction, mean) < 0:
        direction = -direction
    return direction * (differences @ direction).mean()


def reduce_rows(handle: CaptureHandle, layer: int, tokens: str) -> Tensor:
    """One ``[H]`` vector for one capture, following ``tokens`` (see ``TOKEN_REDUCTIONS``)."""
    hidden = handle.hidden(layer)
    prompt = len(handle.prompt_token_ids)
    if tokens == "last_prompt":
        return hidden[prompt - 1]
    if tokens == "prompt_mean":
        return hidden[:prompt].mean(dim=0)
    if tokens == "message_mean":
        if not handle.message_boundaries:
            return hidden[:prompt].mean(dim=0)
        return handle.get_message_activations(len(handle.message_boundaries) - 1, layer).mean(dim=0)
    if tokens == "generated_mean":
        if hidden.shape[0] <= prompt:
            raise CaptureError("generated_mean needs at least two generated tokens (max_tokens >= 2)")
        return hidden[prompt:].mean(dim=0)
    raise SpecError(f"tokens must be one of {TOKEN_REDUCTIONS}, got {tokens!r}")


@dataclass(frozen=True, eq=False)
class ContrastVector:
    """A steering vector found from contrasting examples, with where it came from."""

    vector: Tensor
    layer: int
    method: str
    tokens: str
    model_name: str
    num_pairs: int
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def direction(self) -> Tensor:
        return self.vector / self.vector.norm()

    def to_add_spec(self, scale: float = 1.0, positions: str = "all") -> AddSpec:
        return AddSpec(self.vector, scale=scale, positions=positions)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensor, JSON-able (what a vector library stores beside it)."""
        return {
            "layer": self.layer,
            "method": self.method,
            "tokens": self.tokens,
            "model": self.model_name,
            "num_pairs": self.num_pairs,
            "created": self.created,
            "norm": float(self.vector.norm()),
        }


async def _capture(
    model: SteerModel,
    examples: Sequence[str | Sequence[Mapping[str, Any]]],
    layers: list[int],
    sampling_params: Any,
    chat_options: Mapping[str, Any] | None,
) -> list[CaptureHandle]:
    conversations = [example for example in examples if not isinstance(example, str)]
    if conversations and len(conversations) != len(examples):
        raise SpecError("mix of prompts and conversations; give one kind")
    if conversations:
        _, handles = await model.chat(
            list(examples), sampling_params=sampling_params, capture_layers=layers, chat_options=chat_options
        )
    else:
        _, handles = await model.generate(list(examples), sampling_params, capture_layers=layers)
    await model.fetch_captures_batch(handles)
    return handles


async def extract_contrast_vectors(
    model: SteerModel,
    positive: Sequence[str | Sequence[Mapping[str, Any]]],
    negative: Sequence[str | Sequence[Mapping[str, Any]]],
    layers: Sequence[int],
    method: str = "mean_diff",
    tokens: str = "last_prompt",
    sampling_params: Any = None,
    chat_options: Mapping[str, Any] | None = None,
) -> dict[int, ContrastVector]:
    """A ``ContrastVector`` per layer from paired positive/negative examples.

    Examples are prompts or conversations. Only ``generated_mean`` generates
    more than one token (greedy, 32 tokens unless ``sampling_params`` says).
    """
    if method not in METHODS:
        raise SpecError(f"method must be one of {METHODS}, got {method!r}")
    if tokens not in TOKEN_REDUCTIONS:
        raise SpecError(f"tokens must be one of {TOKEN_REDUCTIONS}, got {tokens!r}")
    if not positive or len(positive) != len(negative):
        raise SpecError(f"need paired examples: got {len(positive)} positive and {len(negative)} negative")
    if sampling_params is None:
        sampling_params = model._resolve_sampling(
            None, {}, temperature=0.0, max_tokens=32 if tokens == "generated_mean" else 1
        )
    layer_list = sorted(set(layers))
    handles = await _capture(model, [*positive, *negative], layer_list, sampling_params, chat_options)
    pairs = len(positive)
    vectors = {}
    for layer in layer_list:
        rows = torch.stack([reduce_rows(handle, layer, tokens) for handle in handles]).float()
        pos, neg = rows[:pairs], rows[pairs:]
        vector = difference_of_means(pos, neg) if method == "mean_diff" else first_principal_component(pos - neg)
        vectors[layer] = ContrastVector(vector, layer, method, tokens, model.model_id, pairs)
    for handle in handles:
        handle.close()
    return vectors
