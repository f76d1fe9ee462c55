"""The decoder-layer wrapper that runs inside vLLM's forward pass.

``SteeredDecoderLayer`` wraps one vLLM decoder layer. Its steering parameters
live in persistent tables with one row per steering *slot* (row 0 is
neutral: zero vectors, open bounds, scale 1), views of ``SteeringTables``
which stacks every layer's, and a shared per-token slot index says which row
each token of the flattened batch uses. The worker fills the tables between
steps and the slot index before every step, both in place, so the same code
serves eager mode, torch.compile and CUDA graphs: nothing here branches on
data.

After the ops, the layer's residual stream is written to a persistent
capture buffer; the worker copies the step's rows out after the step.

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

from workbench import ops


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


@dataclass(frozen=True)
class SteeringTables:
    """Every local layer's steering tables, stacked as ``[layers, num_slots + 1, ...]``.

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
        shape = (layers, num_slots + 1)
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
        hidden = tables.add_vectors.shape[-1]
        kw: dict[str, Any] = {"dtype": tables.add_vectors.dtype, "device": tables.add_vectors.device}
        self.register_buffer("captured", torch.zeros(max_tokens, hidden, **kw), persistent=False)

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
        stream = out + residual
        rows = stream.shape[0]
        slots = self.slot_index[:rows]
        masks = ops.NO_MASKS
        if use.targeted:
            targets = self.op_targets[slots]
            phases = self.row_phases[:rows]
            masks = tuple(ops.position_mask(targets[:, i : i + 1], phases) for i in range(3))  # type: ignore[assignment]
        steered = ops.apply_layer_ops(
            stream,
            add=self.add_vectors[slots] if use.add else None,
            cap_direction=self.cap_directions[slots] if use.cap else None,
            cap_min=self.cap_min[slots] if use.cap else None,
            cap_max=self.cap_max[slots] if use.cap else None,
            ablation_direction=self.ablation_directions[slots] if use.ablation else None,
            ablation_scale=self.ablation_scales[slots] if use.ablation else 1.0,
            masks=masks,
        )
        if capture:
            # A plain in-place write into the persistent buffer: torch.compile
            # turns it into an extra store of the kernel that computes
            # `steered` (no copy kernel of its own), and CUDA graphs replay it.
            self.captured[:rows].copy_(steered)
        return steered, torch.zeros_like(residual)
