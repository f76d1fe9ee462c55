"""Comparisons shared by the engine tests."""

from __future__ import annotations

import torch
from torch import Tensor

from workbench.hf_reference import forward_reference
from workbench.specs import SteeringSpec

COSINE_MIN = 0.99999
RELATIVE_MAX_ERROR = 2e-3
"""Max abs difference allowed, relative to the largest magnitude in the rows (float32)."""


def row_agreement(ours: Tensor, reference: Tensor) -> tuple[float, float]:
    """(minimum per-token cosine, max abs difference / max abs value)."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    cosine = torch.nn.functional.cosine_similarity(ours.double(), reference.double(), dim=-1)
    scale = reference.abs().max().item()
    return cosine.min().item(), (ours - reference).abs().max().item() / scale


def assert_rows_match(ours: Tensor, reference: Tensor) -> tuple[float, float]:
    cosine, error = row_agreement(ours, reference)
    assert cosine >= COSINE_MIN, f"min per-token cosine {cosine:.7f}"
    assert error <= RELATIVE_MAX_ERROR, f"max abs error {error:.2e} of the largest value"
    return cosine, error


def vector(seed: int, hidden: int = 576) -> Tensor:
    """A seeded random vector of the embedded model's hidden size."""
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def mean_direction(hf_model, token_ids: list[int], layer: int) -> Tensor:
    """Unit vector along the mean residual stream at ``layer``: a direction with a
    large projection, so caps and ablations on it change the output."""
    rows = forward_reference(hf_model, token_ids, SteeringSpec(), [layer])[layer]
    mean = rows.mean(dim=0)
    return mean / mean.norm()
