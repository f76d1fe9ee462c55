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


TARGET_CODES = {"all": 0, "prompt": 1, "generated": 2}
"""Integer codes of a spec's ``positions``, as stored in the worker's tables."""


def _where(mask: Tensor | None, changed: Tensor, hidden: Tensor) -> Tensor:
    return changed if mask is None else torch.where(mask, changed, hidden)


OpMasks = tuple[Tensor | None, Tensor | None, Tensor | None]
"""Per-op row masks (``[T, 1]`` bool) for add, cap, ablation; ``None`` means every row."""

NO_MASKS: OpMasks = (None, None, None)


def apply_layer_ops(
    hidden: Tensor,
    add: Tensor | None,
    cap_direction: Tensor | None,
    cap_min: float | Tensor | None,
    cap_max: float | Tensor | None,
    ablation_direction: Tensor | None,
    ablation_scale: float | Tensor,
    masks: OpMasks = NO_MASKS,
) -> Tensor:
    """All ops of one layer in their fixed order: add, then projection cap,
    then ablation. ``None`` skips an op; ``masks`` limit each op to some rows
    (position targeting), leaving the other rows exactly as they were."""
    add_mask, cap_mask, ablation_mask = masks
    if add is not None:
        hidden = _where(add_mask, add_vector(hidden, add), hidden)
    if cap_direction is not None:
        hidden = _where(cap_mask, cap_projection(hidden, cap_direction, cap_min, cap_max), hidden)
    if ablation_direction is not None:
        hidden = _where(ablation_mask, scale_component(hidden, ablation_direction, ablation_scale), hidden)
    return hidden


def position_mask(target: int | Tensor, generated: Tensor) -> Tensor:
    """Rows an op applies to, from its target code (see ``TARGET_CODES``) and
    whether each row is a generated token (``[T, 1]`` bool): "all" takes every
    row, "generated" the generated rows, "prompt" the others."""
    return (target == TARGET_CODES["all"]) | ((target == TARGET_CODES["generated"]) == generated)
