"""The per-slot steering tables of a worker's layers, and one layer's view of them.

Every decoder layer has one row per steering *slot* in each table (row 0 is
neutral: zero vectors, open bounds, scale 1); a per-token slot index says
which row each token of the flattened batch uses. ``SteeringTables`` stacks
the tables of all local layers as ``[layers, rows, ...]``, so a batch of slot
loads is one indexed write per table; ``LayerTables`` is what one layer's
operator reads: its views of those tables plus the per-step inputs shared
by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from workbench.ops import OP_NAMES, target_code
from workbench.specs import LayerSteeringSpec

ALIGNMENT_BYTES = 16
"""torch.compile's generated code assumes its tensor inputs start 16-byte
aligned and clones, at every call, any that do not. Each layer's views of the
stacked tables and capture flags are inputs of the compiled model, so each
must start aligned: misaligned, they cost five small copies per layer and
step (3% of a batch-1 decode step on an H200)."""

NO_LAYER = torch.iinfo(torch.int32).max
"""``nonfinite_rows`` value of a row that no layer turned into inf or NaN."""


def aligned_rows(count: int) -> int:
    """``count`` rounded up to a multiple of ``ALIGNMENT_BYTES``: a table with that
    many rows per layer has a per-layer stride (rows x row bytes) that is a
    multiple of it, whatever the size of a row."""
    return -(-count // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


class LayerTables(NamedTuple):
    """Everything one layer's steering operator reads (``layer_op.steer_rows``),
    in the order the operator takes them."""

    slot_index: Tensor
    """``[max_tokens]`` int64: each row's slot (shared by all layers)."""
    row_codes: Tensor
    """``[max_tokens, 3]`` int16: each row's phase, role and message codes (``ops.RowCodes``; shared)."""
    add_vectors: Tensor
    """``[rows, H]``: per slot, the vector added (vector x scale)."""
    cap_directions: Tensor
    """``[rows, H]``: per slot, the unit direction of the projection cap."""
    cap_min: Tensor
    """``[rows, 1]`` float32: per slot, the cap's lower bound (-inf: open)."""
    cap_max: Tensor
    """``[rows, 1]`` float32: per slot, the cap's upper bound (inf: open)."""
    ablation_directions: Tensor
    """``[rows, H]``: per slot, the unit direction of the ablation."""
    ablation_scales: Tensor
    """``[rows, 1]`` float32: per slot, the factor of the ablated component (1: untouched)."""
    op_targets: Tensor
    """``[rows, 3]`` int16: per slot and op (columns in ``OP_NAMES`` order), its target code (``ops.target_code``)."""
    capture_flag: Tensor
    """``[1]`` int8: non-zero while some request of the step captures this layer."""


@dataclass(frozen=True)
class SteeringTables:
    """Every local layer's slot tables, stacked as ``[layers, rows, ...]``
    with ``rows = aligned_rows(num_slots + 1)``: slot 0 is neutral, rows past
    the last slot stay neutral and pad each layer's view to an aligned start.

    Slot loads are written for all layers and slots at once, one indexed
    write per table: written row by row they took about ten small copies per
    layer and slot, thousands when a batch brings 64 new specs.
    """

    add_vectors: Tensor
    cap_directions: Tensor
    cap_min: Tensor
    cap_max: Tensor
    ablation_directions: Tensor
    ablation_scales: Tensor
    op_targets: Tensor

    @classmethod
    def create(
        cls, layers: int, num_slots: int, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> SteeringTables:
        """All rows neutral: zero vectors, open cap bounds, ablation scale 1, no position targets."""
        shape = (layers, aligned_rows(num_slots + 1))
        host = _neutral_rows(shape, hidden, dtype)
        return cls(**{name: rows.to(device) for name, rows in host.items()})

    def of_layer(self, place: int, slot_index: Tensor, row_codes: Tensor, capture_flag: Tensor) -> LayerTables:
        """The tables of the layer at ``place``, with the step inputs all layers share."""
        views = {name: table[place] for name, table in vars(self).items()}
        return LayerTables(slot_index=slot_index, row_codes=row_codes, capture_flag=capture_flag, **views)

    @torch.no_grad()
    def write(self, places: list[int], slots: list[int], entries: list[LayerSteeringSpec | None]) -> None:
        """Set row ``slots[i]`` of layer ``places[i]`` from ``entries[i]`` (one
        layer of a spec; None makes it neutral). On CUDA the rows go through
        pinned memory without blocking, on the current stream."""
        device = self.add_vectors.device
        host = _neutral_rows((len(entries),), self.add_vectors.shape[-1], self.add_vectors.dtype)
        for row, layer in enumerate(entries):
            if layer is not None:
                _fill_row(host, row, layer)
        host["places"] = torch.tensor(places)
        host["slots"] = torch.tensor(slots)
        if device.type == "cuda":
            host = {name: rows.pin_memory() for name, rows in host.items()}
        rows = {name: tensor.to(device, non_blocking=True) for name, tensor in host.items()}
        index = (rows.pop("places"), rows.pop("slots"))
        for name, values in rows.items():
            getattr(self, name).index_put_(index, values)


def _neutral_rows(shape: tuple[int, ...], hidden: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Vectors in the model's dtype; bounds and scales in float32, the dtype
    the ops compute in (in bfloat16 an ablation scale of 0.3 would be 0.30078)."""
    return {
        "add_vectors": torch.zeros(*shape, hidden, dtype=dtype),
        "cap_directions": torch.zeros(*shape, hidden, dtype=dtype),
        "cap_min": torch.full((*shape, 1), -torch.inf),
        "cap_max": torch.full((*shape, 1), torch.inf),
        "ablation_directions": torch.zeros(*shape, hidden, dtype=dtype),
        "ablation_scales": torch.ones(*shape, 1),
        "op_targets": torch.zeros(*shape, len(OP_NAMES), dtype=torch.int16),
    }


def _fill_row(host: dict[str, Tensor], row: int, layer: LayerSteeringSpec) -> None:
    for name, op in layer.ops():
        host["op_targets"][row, OP_NAMES.index(name)] = target_code(op.positions)
    if (add := layer.add) is not None:
        host["add_vectors"][row] = add.effect
    if (cap := layer.projection_cap) is not None:
        host["cap_directions"][row] = cap.vector
        host["cap_min"][row] = -torch.inf if cap.min is None else cap.min
        host["cap_max"][row] = torch.inf if cap.max is None else cap.max
    if (ablation := layer.ablation) is not None:
        host["ablation_directions"][row] = ablation.vector
        host["ablation_scales"][row] = ablation.scale
