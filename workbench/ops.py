"""The math of the steering ops, in one place.

Both backends call these functions: the vLLM worker with per-token tensors
gathered from its slot tables (``[T, H]`` directions, ``[T, 1]`` scalars) and
the Hugging Face reference with one spec's vectors (``[H]``) and plain floats.
Broadcasting makes the two the same code.

Every op is exactly the identity for its neutral parameters (zero add vector,
zero direction, ablation scale 1), so unsteered tokens in a steered batch keep
bit-identical hidden states.
"""

from __future__ import annotations

import torch
from torch import Tensor


def projection(hidden: Tensor, direction: Tensor) -> Tensor:
    """Component of each row of ``hidden`` along a unit ``direction``, shape ``[..., 1]``."""
    return (hidden * direction).sum(dim=-1, keepdim=True)


def add_vector(hidden: Tensor, vector: Tensor) -> Tensor:
    """Additive steering: ``hidden + vector``."""
    return hidden + vector


def cap_projection(
    hidden: Tensor,
    direction: Tensor,
    min: float | Tensor | None,
    max: float | Tensor | None,
) -> Tensor:
    """Clamp the projection on a unit ``direction`` to ``[min, max]``, leaving
    the orthogonal part of ``hidden`` untouched."""
    proj = projection(hidden, direction)
    return hidden + (torch.clamp(proj, min=min, max=max) - proj) * direction


def scale_component(hidden: Tensor, direction: Tensor, scale: float | Tensor) -> Tensor:
    """Multiply the component along a unit ``direction`` by ``scale`` (0 removes
    it, 1 is the identity, >1 amplifies)."""
    return hidden + (scale - 1.0) * projection(hidden, direction) * direction


def apply_layer_ops(
    hidden: Tensor,
    add: Tensor | None,
    cap_direction: Tensor | None,
    cap_min: float | Tensor | None,
    cap_max: float | Tensor | None,
    ablation_direction: Tensor | None,
    ablation_scale: float | Tensor,
) -> Tensor:
    """All ops of one layer in their fixed order: add, then projection cap,
    then ablation. ``None`` skips an op."""
    if add is not None:
        hidden = add_vector(hidden, add)
    if cap_direction is not None:
        hidden = cap_projection(hidden, cap_direction, cap_min, cap_max)
    if ablation_direction is not None:
        hidden = scale_component(hidden, ablation_direction, ablation_scale)
    return hidden
