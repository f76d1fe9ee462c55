"""The decoder-layer wrapper that runs inside vLLM's forward pass.

``SteeredDecoderLayer`` wraps one vLLM decoder layer. Its steering parameters
live in persistent tables with one row per steering *slot* (row 0 is
neutral: zero vectors, open bounds, scale 1), views of ``SteeringTables``
which stacks every layer's, and a shared per-token slot index says which row
each token of the flattened batch uses. The worker fills the tables between
steps, and the slot index and per-layer capture flags before every step, all
in place, so the same code serves eager mode, torch.compile and CUDA graphs:
nothing here branches on data.

The ops and the write of the steered stream into a persistent capture buffer
(the worker copies the step's rows out after the step) run as one operator,
``workbench.layer_op``: a fused Triton kernel on CUDA, which skips the write
when the layer's capture flag is off, torch ops elsewhere.

In eager mode (no torch.compile, no CUDA graphs) Python runs at every step,
so a ``StepPlan`` written by the worker before each step lets a layer skip the
ops no request of the step uses, and the capture write when nobody captures it:
a loaded but idle runtime then costs one attribute check per layer. Compiled
engines always take the full path, which has no data-dependent branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workbench import layer_op, ops


@dataclass
class StepPlan:
    """What the step about to run needs from each layer (read only in eager mode)."""

    eager: bool
    layer_ops: dict[int, LayerUse] = field(default_factory=dict)
    """Layer -> what the requests of the step use there."""
    capture_layers: frozenset[int] = frozenset()


@dataclass(frozen=True)
class LayerUse:
    """Which ops some request uses at a layer, and whether any is position-targeted."""

    add: bool = False
    cap: bool = False
    ablation: bool = False
    targeted: bool = False

    def __or__(self, other: LayerUse) -> LayerUse:
        return LayerUse(*(a or b for a, b in zip(vars(self).values(), vars(other).values())))


FULL_USE = LayerUse(add=True, cap=True, ablation=True, targeted=True)
NO_USE = LayerUse()


ALIGNMENT_BYTES = 16
"""torch.compile's generated code assumes its tensor inputs start 16-byte
aligned and clones, at every call, any that do not. Each layer's views of the
stacked tables and capture flags are inputs of the compiled model, so each
must start aligned: misaligned, they cost five small copies per layer and
step (3% of a batch-1 decode step on an H200)."""


def aligned_rows(count: int) -> int:
    """``count`` rounded up to a multiple of ``ALIGNMENT_BYTES``: a table with that
    many rows per layer has a per-layer stride (rows x row bytes) that is a
    multiple of it, whatever the size of a row."""
    return -(-count // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


@dataclass(frozen=True)
class SteeringTables:
    """Every local layer's steering tables, stacked as ``[layers, rows, ...]``
    with ``rows = aligned_rows(num_slots + 1)``: slot 0 is neutral, rows past
    the last slot stay neutral and pad each layer's view to an aligned start.

    Each ``SteeredDecoderLayer`` holds views of its own layer. Slot loads are
    written for all layers and slots at once, one indexed write per table:
    written row by row they took about ten small copies per layer and slot,
    thousands when a batch brings 64 new specs.
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

    def of_layer(self, place: int) -> dict[str, Tensor]:
        return {name: table[place] for name, table in vars(self).items()}

    @torch.no_grad()
    def write(self, places: list[int], slots: list[int], entries: list[dict[str, Any] | None]) -> None:
        """Set row ``slots[i]`` of layer ``places[i]`` from ``entries[i]`` (one layer
        of ``worker.decode_spec``; None makes it neutral). On CUDA the rows go
        through pinned memory without blocking, on the current stream."""
        device = self.add_vectors.device
        host = _neutral_rows((len(entries),), self.add_vectors.shape[-1], self.add_vectors.dtype)
        for row, params in enumerate(entries):
            for column, name in enumerate(OPS):
                if params and name in params:
                    _fill_row(host, row, column, name, params[name])
        host["places"] = torch.tensor(places)
        host["slots"] = torch.tensor(slots)
        if device.type == "cuda":
            host = {name: rows.pin_memory() for name, rows in host.items()}
        rows = {name: tensor.to(device, non_blocking=True) for name, tensor in host.items()}
        index = (rows.pop("places"), rows.pop("slots"))
        for name, values in rows.items():
            getattr(self, name).index_put_(index, values)


OPS = ("add", "projection_cap", "ablation")
"""Op names in a decoded spec, in the column order of ``op_targets``."""


def _neutral_rows(shape: tuple[int, ...], hidden: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        "add_vectors": torch.zeros(*shape, hidden, dtype=dtype),
        "cap_directions": torch.zeros(*shape, hidden, dtype=dtype),
        "cap_min": torch.full((*shape, 1), -torch.inf, dtype=dtype),
        "cap_max": torch.full((*shape, 1), torch.inf, dtype=dtype),
        "ablation_directions": torch.zeros(*shape, hidden, dtype=dtype),
        "ablation_scales": torch.ones(*shape, 1, dtype=dtype),
        "op_targets": torch.zeros(*shape, 3, dtype=torch.int8),
    }


def _fill_row(host: dict[str, Tensor], row: int, column: int, name: str, op: dict[str, Any]) -> None:
    if name == "add":
        host["add_vectors"][row] = op["vector"]
    elif name == "projection_cap":
        host["cap_directions"][row] = op["vector"]
        host["cap_min"][row] = -torch.inf if op["min"] is None else op["min"]
        host["cap_max"][row] = torch.inf if op["max"] is None else op["max"]
    else:
        host["ablation_directions"][row] = op["vector"]
        host["ablation_scales"][row] = op["scale"]
    host["op_targets"][row, column] = ops.TARGET_CODES[op["positions"]]


class SteeredDecoderLayer(nn.Module):
    """A decoder layer followed by the steering ops and a capture write.

    vLLM's Llama-style layers return ``(hidden_states, residual)`` whose sum is
    the residual stream after the layer (HF ``hidden_states[i + 1]``). We
    steer that sum and hand it on as ``(steered, zeros)``: the next layer's
    fused add-norm then sees exactly ``steered``, and an unsteered token sees
    exactly the sum vLLM would have formed itself.
    """

    def __init__(
        self,
        inner: nn.Module,
        index: int,
        plan: StepPlan,
        tables: SteeringTables,
        place: int,
        slot_index: Tensor,
        row_phases: Tensor,
        capture_flags: Tensor,
        max_tokens: int,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.plan = plan
        for name, table in tables.of_layer(place).items():
            self.register_buffer(name, table, persistent=False)
        self.register_buffer("slot_index", slot_index, persistent=False)
        self.register_buffer("row_phases", row_phases, persistent=False)
        self.register_buffer("capture_flag", capture_flags[place, :1], persistent=False)
        hidden = tables.add_vectors.shape[-1]
        kw: dict[str, Any] = {"dtype": tables.add_vectors.dtype, "device": tables.add_vectors.device}
        self.register_buffer("captured", torch.zeros(max_tokens, hidden, **kw), persistent=False)
        self._steer_rows = layer_op.steer_rows_for(self.captured.device)

    def forward(
        self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        out, residual = self.inner(positions, hidden_states, residual, *args, **kwargs)
        if not self.plan.eager:
            return self._steer(out, residual, FULL_USE, capture=True)
        use = self.plan.layer_ops.get(self.index)
        capture = self.index in self.plan.capture_layers
        if use is None and not capture:
            return out, residual
        return self._steer(out, residual, use or NO_USE, capture)

    def _steer(self, out: Tensor, residual: Tensor, use: LayerUse, capture: bool) -> tuple[Tensor, Tensor]:
        tables = (
            self.slot_index,
            self.row_phases,
            self.add_vectors,
            self.cap_directions,
            self.cap_min,
            self.cap_max,
            self.ablation_directions,
            self.ablation_scales,
            self.op_targets,
            self.captured,
            self.capture_flag,
        )
        if self.plan.eager or self._steer_rows is layer_op.steer_rows_torch:
            # Eager: the implementation directly. Compiled without a fused kernel
            # (CPU): the torch code inline, for inductor to fuse.
            steered = self._steer_rows(out, residual, *tables, capture, **vars(use))
        else:
            # The fused kernel as a custom op: one opaque call for torch.compile,
            # writing the capture buffer in place.
            steered = torch.ops.workbench.steer_rows(out, residual, *tables, capture)
        return steered, torch.zeros_like(residual)
