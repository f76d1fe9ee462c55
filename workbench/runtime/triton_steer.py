"""The steering ops of one layer as one Triton kernel (CUDA).

Implements ``workbench.ops.apply_layer_ops`` (add, projection cap, ablation,
in that order, each limited to its positions) on rows of the flattened batch,
each row with the tables of its slot, and writes the result to the output
and, on steps that capture the layer, to its capture buffer. A steered row
that comes out broken (inf, NaN, or squares summing beyond float32: a norm
above ``ops.NORM_LIMIT``) gets the
layer's index in ``nonfinite_rows`` (kept if an earlier layer is there already).

Why a kernel of its own: left to torch.compile, the ops were fused with the
next layer's RMSNorm into one looped reduction that read every row three
times, 20 us per layer at batch 1 on an H200 (the plain norm takes 2 us) and
~45 us at 256 rows. Here one
program holds a row in registers, takes the three dot products in one pass
(only for rows whose slot caps or ablates) and writes once, or twice when
the layer is captured.

Numerics: the stream ``out + residual`` (or ``out`` alone, for layers that
return the stream) is rounded to the model's dtype as torch rounds it, the
ops run in float32 and the result is rounded once, as the torch path does.
Neutral parameters (zero vectors, open bounds, scale 1) give back the
rounded stream bit for bit, as the torch path does; an add alone equals the
torch path's result bit for bit; cap and ablation differ from torch's
op-by-op bf16 rounding by at most a rounding step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from workbench.ops import FLOAT32_MAX, OP_NAMES, TARGET_CODES
from workbench.runtime.steering_tables import LayerTables

# Globals a Triton kernel reads must be constexpr objects.
ADD = tl.constexpr(OP_NAMES.index("add"))
CAP = tl.constexpr(OP_NAMES.index("projection_cap"))
ABLATION = tl.constexpr(OP_NAMES.index("ablation"))
"""Columns of the per-slot target table."""
OPS = tl.constexpr(len(OP_NAMES))
EVERY_ROW = tl.constexpr(TARGET_CODES["all"])


@triton.jit
def _targets(target, phase, role, message):
    return (target == EVERY_ROW) | (target == phase) | (target == role) | (target == message)


@triton.jit
def _steer_rows_kernel(
    out_ptr,
    residual_ptr,
    steered_ptr,
    captured_ptr,
    capture_flag_ptr,
    nonfinite_ptr,
    layer,
    limit,
    slot_ptr,
    codes_ptr,
    add_ptr,
    cap_direction_ptr,
    cap_min_ptr,
    cap_max_ptr,
    ablation_direction_ptr,
    ablation_scale_ptr,
    targets_ptr,
    hidden,
    out_stride,
    residual_stride,
    HAS_RESIDUAL: tl.constexpr,
    CAPTURE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    out = tl.load(out_ptr + row * out_stride + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + cols, mask=inside, other=0.0)
        stream = (out.to(tl.float32) + residual.to(tl.float32)).to(out.dtype).to(tl.float32)
    else:
        stream = out.to(tl.float32)

    slot = tl.load(slot_ptr + row)
    # The row's codes (ops.RowCodes): a target other than "every row" must equal one of them.
    phase = tl.load(codes_ptr + row * 3).to(tl.int32)
    role = tl.load(codes_ptr + row * 3 + 1).to(tl.int32)
    message = tl.load(codes_ptr + row * 3 + 2).to(tl.int32)
    table = slot * hidden + cols
    add_target = tl.load(targets_ptr + slot * OPS + ADD).to(tl.int32)
    add_here = _targets(add_target, phase, role, message)
    # Slot 0 is neutral (zero vector): its rows skip the load.
    # (A select rather than `inside & scalar`: Triton's interpreter rejects a mask mixing the two.)
    add = tl.load(add_ptr + table, mask=tl.where((slot != 0) & add_here, inside, False), other=0.0)
    add = add.to(tl.float32)
    steered = stream + add

    cap_min = tl.load(cap_min_ptr + slot).to(tl.float32)
    cap_max = tl.load(cap_max_ptr + slot).to(tl.float32)
    scale = tl.load(ablation_scale_ptr + slot).to(tl.float32)
    # Open bounds and scale 1 are exact no-ops (a zero shift and coefficient):
    # rows without a cap or ablation skip the directions and the reductions.
    if (cap_min > float("-inf")) | (cap_max < float("inf")) | (scale != 1.0):
        cap_target = tl.load(targets_ptr + slot * OPS + CAP).to(tl.int32)
        ablation_target = tl.load(targets_ptr + slot * OPS + ABLATION).to(tl.int32)
        cap_direction = tl.load(cap_direction_ptr + table, mask=inside, other=0.0).to(tl.float32)
        ablation_direction = tl.load(ablation_direction_ptr + table, mask=inside, other=0.0).to(tl.float32)
        cap_projection = tl.sum(steered * cap_direction, axis=0)
        shift = tl.minimum(tl.maximum(cap_projection, cap_min), cap_max) - cap_projection
        shift = tl.where(_targets(cap_target, phase, role, message), shift, 0.0)
        ablation_projection = tl.sum(steered * ablation_direction, axis=0)
        ablation_projection += shift * tl.sum(cap_direction * ablation_direction, axis=0)
        coefficient = tl.where(
            _targets(ablation_target, phase, role, message), (scale - 1.0) * ablation_projection, 0.0
        )
        steered = steered + shift * cap_direction + coefficient * ablation_direction
    steered = steered.to(out.dtype)
    tl.store(steered_ptr + row * hidden + cols, steered, mask=inside)
    if slot != 0:
        value = steered.to(tl.float32)
        # As the next layer's norm does: the squares summed in float32. NaN fails
        # every comparison, so "not within the limit" catches it with inf and overflow.
        squares = tl.sum(value * value, axis=0)
        if ~(squares <= limit):
            # Rows run layer after layer, so a plain read-modify-write keeps the lowest layer.
            tl.store(nonfinite_ptr + row, tl.minimum(tl.load(nonfinite_ptr + row), layer))
    # The layer's capture flag (set per step by the worker) spares the write
    # on steps where no request captures this layer.
    if CAPTURE:
        if tl.load(capture_flag_ptr) != 0:
            tl.store(captured_ptr + row * hidden + cols, steered, mask=inside)


def steer_rows(
    out: Tensor,
    residual: Tensor | None,
    tables: Sequence[Tensor],
    captured: Tensor,
    nonfinite_rows: Tensor,
    layer: int,
    capture: bool,
) -> Tensor:
    """The kernel over ``out.shape[0]`` rows (the signature of ``layer_op.steer_rows_op``,
    whose CUDA kernel this is). ``tables`` is one layer's ``LayerTables``
    (contiguous ``[slots + 1, ...]`` views); ``slot_index`` / ``row_codes`` /
    ``captured`` / ``nonfinite_rows`` have at least as many rows as ``out``.
    With ``capture``, the capture buffer is written when the layer's capture
    flag is non-zero. The kernel decides per row from its slot's parameters
    which ops to run."""
    rows, hidden = out.shape
    steered = torch.empty((rows, hidden), dtype=out.dtype, device=out.device)
    if rows:
        t = LayerTables._make(tables)
        block = triton.next_power_of_2(hidden)
        _steer_rows_kernel[(rows,)](
            out,
            out if residual is None else residual,
            steered,
            captured,
            t.capture_flag,
            nonfinite_rows,
            layer,
            FLOAT32_MAX,
            t.slot_index,
            t.row_codes,
            t.add_vectors,
            t.cap_directions,
            t.cap_min,
            t.cap_max,
            t.ablation_directions,
            t.ablation_scales,
            t.op_targets,
            hidden,
            out.stride(0),
            out.stride(0) if residual is None else residual.stride(0),
            HAS_RESIDUAL=residual is not None,
            CAPTURE=capture,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),
        )
    return steered
