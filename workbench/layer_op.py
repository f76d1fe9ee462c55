"""One layer's steering and capture write, as one operator.

``steer_rows`` takes a decoder layer's ``(out, residual)`` pair, applies the
ops of each row's slot to their sum (the residual stream) and writes the
result into the layer's capture buffer. Two implementations:

- ``steer_rows_torch``: the math of ``workbench.ops`` on gathered table rows,
  any device; it skips the ops no row of the step uses (``LayerUse``).
- ``workbench.triton_steer``: one fused kernel, on CUDA when Triton is there.

Compiled engines with the fused kernel call it as the custom op
``torch.ops.workbench.steer_rows``, which torch.compile keeps as one opaque
call (inductor otherwise fused the ops with the next layer's norm into a
slow kernel, see ``triton_steer``); the capture buffer is declared mutated,
so it is written in place. Compiled engines without it (CPU) trace the torch
code, which inductor fuses well there (as an opaque op it cost ~12% of CPU
throughput). Eager engines call the implementation directly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from workbench import ops

logger = logging.getLogger(__name__)

SteerRows = Callable[..., Tensor]


def steer_rows_torch(
    out: Tensor,
    residual: Tensor,
    slot_index: Tensor,
    row_phases: Tensor,
    add_vectors: Tensor,
    cap_directions: Tensor,
    cap_min: Tensor,
    cap_max: Tensor,
    ablation_directions: Tensor,
    ablation_scales: Tensor,
    op_targets: Tensor,
    captured: Tensor,
    capture_flag: Tensor,
    capture: bool,
    add: bool = True,
    cap: bool = True,
    ablation: bool = True,
    targeted: bool = True,
) -> Tensor:
    """``ops.apply_layer_ops`` on ``out + residual``, each row with its slot's
    table rows; ``add`` / ``cap`` / ``ablation`` / ``targeted`` False skip what
    no row uses. ``capture`` writes the result into ``captured`` (the fused
    kernel also reads the layer's ``capture_flag``; this path has no
    data-dependent branch, so a compiled engine writes it every step)."""
    stream = out + residual
    rows = stream.shape[0]
    slots = slot_index[:rows]
    masks = ops.NO_MASKS
    if targeted:
        targets = op_targets[slots]
        phases = row_phases[:rows]
        masks = tuple(ops.position_mask(targets[:, i : i + 1], phases) for i in range(3))  # type: ignore[assignment]
    steered = ops.apply_layer_ops(
        stream,
        add=add_vectors[slots] if add else None,
        cap_direction=cap_directions[slots] if cap else None,
        cap_min=cap_min[slots] if cap else None,
        cap_max=cap_max[slots] if cap else None,
        ablation_direction=ablation_directions[slots] if ablation else None,
        ablation_scale=ablation_scales[slots] if ablation else 1.0,
        masks=masks,
    )
    if capture:
        captured[:rows].copy_(steered)
    return steered


steer_rows_op = torch.library.custom_op("workbench::steer_rows", steer_rows_torch, mutates_args=("captured",))
"""``torch.ops.workbench.steer_rows``: ``steer_rows_torch`` as an operator, with the Triton kernel for CUDA tensors."""


@steer_rows_op.register_fake
def _(out: Tensor, *args: object) -> Tensor:
    return torch.empty_like(out, memory_format=torch.contiguous_format)


@functools.cache
def _triton_steer_rows() -> SteerRows | None:
    """The Triton implementation, registered as the custom op's CUDA kernel on first use."""
    try:
        from workbench.triton_steer import steer_rows
    except ImportError:
        logger.warning("workbench: Triton is not available; steering on CUDA uses the slower torch path")
        return None
    steer_rows_op.register_kernel("cuda")(steer_rows)
    return steer_rows


def steer_rows_for(device: torch.device) -> SteerRows:
    """The implementation for ``device`` (an eager engine calls it directly)."""
    if device.type == "cuda":
        return _triton_steer_rows() or steer_rows_torch
    return steer_rows_torch
