"""The math of the steering ops, in one place.

Both backends call these functions: the vLLM worker with per-token tensors
gathered from its slot tables (``[T, H]`` directions, ``[T, 1]`` scalars) and
the Hugging Face reference with one spec's vectors (``[H]``) and plain floats.
Broadcasting makes the two the same code.

On CUDA the engine runs ``apply_layer_ops`` as one fused Triton kernel
(``workbench.runtime.triton_steer``), a second implementation of the same formulas;
the GPU tests hold it to this one (bit-equal where no cap or ablation acts).

Every op is exactly the identity for its neutral parameters (zero add vector,
zero direction, ablation scale 1), so unsteered tokens in a steered batch keep
bit-identical hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def projection(hidden: Tensor, direction: Tensor) -> Tensor:
    """Component of each row of ``hidden`` along a unit ``direction``, shape ``[..., 1]``."""
    return (hidden * direction).sum(dim=-1, keepdim=True)


FLOAT32_MAX = torch.finfo(torch.float32).max

NORM_LIMIT = math.sqrt(FLOAT32_MAX)
"""The largest norm a residual-stream row can have (1.8e19): the next layer's
norm sums its squares in float32, and beyond this the sum overflows, the norm
zeroes the row and the model's output is lost, with no inf or NaN in the
stream itself."""


def broken_rows(hidden: Tensor) -> Tensor:
    """Rows (``[T]`` bool) holding inf or NaN, or whose squares sum beyond float32
    (a norm above ``NORM_LIMIT``)."""
    return ~(hidden.float().square().sum(dim=-1) <= FLOAT32_MAX)


OP_NAMES = ("add", "projection_cap", "ablation")
"""The ops, in the order they apply; also the column order of the workers'
per-op target table (``op_targets[..., OP_NAMES.index(name)]``)."""

ROLES = ("system", "user", "assistant", "tool", "developer")
"""Chat roles an op can target (``positions="user"``: the rows of user messages)."""

TARGET_CODES = {"all": 0, "prompt": 1, "generated": 2, **{role: 3 + i for i, role in enumerate(ROLES)}}
"""Integer codes of a spec's named ``positions``, as stored in the worker's tables."""

MESSAGE_CODE = 16
"""Code of message index 0 (``positions=i`` targets the rows of chat message ``i``: code 16 + i)."""

MAX_MESSAGE = 32767 - MESSAGE_CODE
"""Highest message index a code can name (codes are int16)."""

RowCodes = Tensor
"""``[T, 3]`` int16 per row: its phase code (prompt or generated), its message's
role code (0 outside chat), its message's code (0: none). Generated rows of a
chat are the assistant's, in no message of the prompt. The three ranges of
codes are disjoint, so an op's target matches a row when it equals any of them."""


def target_code(positions: str | int) -> int:
    """The code of a spec's ``positions`` (a name of ``TARGET_CODES`` or a message index)."""
    return positions + MESSAGE_CODE if isinstance(positions, int) else TARGET_CODES[positions]


def _masked(mask: Tensor | None, value: Tensor | float) -> Tensor | float:
    """``value`` on the rows of ``mask`` and exactly zero elsewhere."""
    return value if mask is None else torch.where(mask, value, 0.0)


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
    """All ops of one layer in their fixed order (``OP_NAMES``): add
    ``hidden + add``, then the projection cap (clamp the projection on the
    unit ``cap_direction`` to ``[cap_min, cap_max]``, leaving the orthogonal
    part untouched), then the ablation (multiply the component along the
    unit ``ablation_direction`` by ``ablation_scale``: 0 removes it, 1 keeps
    it). ``None`` skips an op; ``masks`` limit each op to some rows (position
    targeting), leaving the other rows exactly as they were.

    Evaluated in one pass: both projections are taken of the stream after the
    add, and the ablation's projection is corrected for the cap's shift ``d``
    along ``c`` by ``(h + d c) . a = h . a + d (c . a)``. The three dot
    products then share one reduction over the hidden size, which is what
    lets a compiler emit one kernel for the ops of a layer instead of one per
    op (they are the per-layer cost under CUDA graphs).
    """
    add_mask, cap_mask, ablation_mask = masks
    if add is not None:
        hidden = hidden + _masked(add_mask, add)
    steered = hidden
    shift: Tensor | None = None
    if cap_direction is not None:
        proj = projection(hidden, cap_direction)
        shift = _masked(cap_mask, torch.clamp(proj, min=cap_min, max=cap_max) - proj)  # type: ignore[assignment]
        steered = steered + shift * cap_direction
    if ablation_direction is not None:
        proj = projection(hidden, ablation_direction)
        if shift is not None:
            proj = proj + shift * projection(cap_direction, ablation_direction)  # type: ignore[arg-type]
        steered = steered + _masked(ablation_mask, (ablation_scale - 1.0) * proj) * ablation_direction
    return steered


def position_mask(target: int | Tensor, codes: RowCodes) -> Tensor:
    """Rows (``[T, 1]`` bool) an op applies to, from its target code (see
    ``target_code``) and each row's codes (``RowCodes``): "all" takes every
    row, the others the rows whose phase, role or message they name. Codes
    compare as integers on both sides (comparing bools with bools hits a
    vectorisation bug of torch.compile's CPU backend inside fused reductions)."""
    phase, role, message = codes[:, 0:1], codes[:, 1:2], codes[:, 2:3]
    return (target == TARGET_CODES["all"]) | (target == phase) | (target == role) | (target == message)


MessageSpan = tuple[int, int, int]
"""A chat message as the workers see it: its first row, its end row, its role's code."""


def row_codes(positions: np.ndarray, prompt_length: int, messages: Sequence[MessageSpan] = ()) -> np.ndarray:
    """``RowCodes`` (as int16 numpy) of one sequence's rows at ``positions``,
    given its prompt length and, in chat, its messages' spans."""
    codes = np.zeros((positions.shape[0], 3), dtype=np.int16)
    generated = positions >= prompt_length
    codes[:, 0] = np.where(generated, TARGET_CODES["generated"], TARGET_CODES["prompt"])
    if messages:
        ends = np.array([end for _, end, _ in messages])
        index = np.minimum(np.searchsorted(ends, positions, side="right"), len(messages) - 1)
        roles = np.array([role for _, _, role in messages], dtype=np.int16)
        codes[:, 1] = np.where(generated, TARGET_CODES["assistant"], roles[index])
        codes[:, 2] = np.where(generated, 0, MESSAGE_CODE + index)
    return codes
