"""One layer's steering, capture write and inf/NaN watch, as one operator.

``steer_rows`` takes a decoder layer's output stream (``out + residual``, or
``out`` alone), applies the ops of each row's slot (``LayerTables``) in
float32, rounding once to the model's dtype, writes the result into
the layer's capture buffer, and marks in ``nonfinite_rows`` the steered rows
that came out broken (inf, NaN, or a norm beyond what the next layer's norm
can square: ``ops.NORM_LIMIT``), the lowest such layer per row. Two implementations:

- ``steer_rows_torch``: the math of ``workbench.ops`` on gathered table rows,
  any device; it skips the ops no row of the step uses (``LayerUse``).
- ``workbench.runtime.triton_steer``: one fused kernel, on CUDA when Triton is there.

Compiled engines with the fused kernel call it as the custom op
``torch.ops.workbench.steer_rows``, which torch.compile keeps as one opaque
call (inductor otherwise fused the ops with the next layer's norm into a
slow kernel, see ``triton_steer``); the capture buffer and the marks are
declared mutated, so they are written in place. Compiled engines without it
(CPU) trace the torch code, which inductor fuses well there (as an opaque op
it cost ~12% of CPU throughput). Eager engines call the implementation directly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench import ops
from workbench.runtime.steering_tables import LayerTables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerUse:
    """Which ops some request of a step uses at a layer, and whether any is position-targeted."""

    add: bool = False
    cap: bool = False
    ablation: bool = False
    targeted: bool = False

    def __or__(self, other: LayerUse) -> LayerUse:
        return LayerUse(*(a or b for a, b in zip(vars(self).values(), vars(other).values())))


FULL_USE = LayerUse(add=True, cap=True, ablation=True, targeted=True)
NO_USE = LayerUse()

SteerRows = Callable[..., Tensor]


def steer_rows_torch(
    out: Tensor,
    residual: Tensor | None,
    tables: LayerTables,
    captured: Tensor,
    nonfinite_rows: Tensor,
    layer: int,
    capture: bool,
    use: LayerUse = FULL_USE,
    watch: bool = True,
) -> Tensor:
    """``ops.apply_layer_ops`` on ``out + residual`` (the sum rounded to the
    model's dtype as the next layer would form it; ``out`` when ``residual`` is
    None), each row with its slot's table rows, in float32, the result rounded
    once; ``use`` says which ops some row uses (the others are skipped).
    ``capture`` writes the result into ``captured`` (the fused kernel also
    reads the layer's capture flag; this path has no data-dependent branch, so
    a compiled engine writes it every step); ``watch`` marks steered rows
    that broke (``ops.broken_rows``)."""
    stream = out if residual is None else out + residual
    rows = stream.shape[0]
    slots = tables.slot_index[:rows]
    masks = ops.NO_MASKS
    if use.targeted:
        targets = tables.op_targets[slots]
        codes = tables.row_codes[:rows]
        masks = tuple(ops.position_mask(targets[:, i : i + 1], codes) for i in range(len(ops.OP_NAMES)))  # type: ignore[assignment]

    def rows_of(table: Tensor) -> Tensor:
        return table[slots].float()

    steered = ops.apply_layer_ops(
        stream.float(),
        add=rows_of(tables.add_vectors) if use.add else None,
        cap_direction=rows_of(tables.cap_directions) if use.cap else None,
        cap_min=rows_of(tables.cap_min) if use.cap else None,
        cap_max=rows_of(tables.cap_max) if use.cap else None,
        ablation_direction=rows_of(tables.ablation_directions) if use.ablation else None,
        ablation_scale=rows_of(tables.ablation_scales) if use.ablation else 1.0,
        masks=masks,
    ).to(stream.dtype)
    if watch:
        marks = nonfinite_rows[:rows]
        broken = slots.ne(0) & ops.broken_rows(steered)
        marks.copy_(torch.where(broken, marks.clamp(max=layer), marks))
    if capture:
        captured[:rows].copy_(steered)
    return steered


@torch.library.custom_op("workbench::steer_rows", mutates_args=("captured", "nonfinite_rows"))
def steer_rows_op(
    out: Tensor,
    residual: Tensor | None,
    tables: list[Tensor],
    captured: Tensor,
    nonfinite_rows: Tensor,
    layer: int,
    capture: bool,
) -> Tensor:
    """``torch.ops.workbench.steer_rows``: ``steer_rows_torch`` as an operator
    (``tables`` as the list of a ``LayerTables``), with the Triton kernel for CUDA tensors."""
    return steer_rows_torch(out, residual, LayerTables._make(tables), captured, nonfinite_rows, layer, capture)


@steer_rows_op.register_fake
def _(out: Tensor, *args: object) -> Tensor:
    return torch.empty_like(out, memory_format=torch.contiguous_format)


@functools.cache
def _triton_steer_rows() -> SteerRows | None:
    """The Triton implementation, registered as the custom op's CUDA kernel on first use."""
    try:
        from workbench.runtime.triton_steer import steer_rows
    except ImportError:
        logger.warning("workbench: Triton is not available; steering on CUDA uses the slower torch path")
        return None
    steer_rows_op.register_kernel("cuda")(steer_rows)
    return steer_rows


def fused_kernel(device: torch.device) -> SteerRows | None:
    """The fused kernel for layers on ``device`` (CUDA with Triton), else None."""
    return _triton_steer_rows() if device.type == "cuda" else None
