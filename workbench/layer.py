"""The decoder-layer wrapper that runs inside vLLM's forward pass.

``SteeredDecoderLayer`` wraps one vLLM decoder layer. Its steering parameters
live in persistent per-layer tables with one row per steering *slot* (row 0
is neutral: zero vectors, open bounds, scale 1), and a shared per-token slot
index says which row each token of the flattened batch uses. The worker
fills the tables between requests and the slot index before every step, both
in place, so the same code serves eager mode, torch.compile and CUDA graphs:
nothing here branches on data.

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
        num_slots: int,
        slot_index: Tensor,
        row_phases: Tensor,
        max_tokens: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.plan = plan
        rows = num_slots + 1
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.register_buffer("add_vectors", torch.zeros(rows, hidden_size, **kw), persistent=False)
        self.register_buffer("cap_directions", torch.zeros(rows, hidden_size, **kw), persistent=False)
        self.register_buffer("cap_min", torch.full((rows, 1), -torch.inf, **kw), persistent=False)
        self.register_buffer("cap_max", torch.full((rows, 1), torch.inf, **kw), persistent=False)
        self.register_buffer("ablation_directions", torch.zeros(rows, hidden_size, **kw), persistent=False)
        self.register_buffer("ablation_scales", torch.ones(rows, 1, **kw), persistent=False)
        self.register_buffer("op_targets", torch.zeros(rows, 3, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("slot_index", slot_index, persistent=False)
        self.register_buffer("row_phases", row_phases, persistent=False)
        self.register_buffer("captured", torch.zeros(max_tokens, hidden_size, **kw), persistent=False)

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

    @torch.no_grad()
    def write_slot(self, slot: int, params: dict[str, Any] | None) -> None:
        """Set table row ``slot`` from one layer of ``worker.decode_spec``; ``None`` makes it neutral."""
        params = params or {}
        add = params.get("add")
        cap = params.get("projection_cap")
        ablation = params.get("ablation")
        self.add_vectors[slot] = 0.0 if add is None else add["vector"].to(self.add_vectors)
        if cap is None:
            self.cap_directions[slot] = 0.0
            self.cap_min[slot] = -torch.inf
            self.cap_max[slot] = torch.inf
        else:
            self.cap_directions[slot] = cap["vector"].to(self.cap_directions)
            self.cap_min[slot] = -torch.inf if cap["min"] is None else cap["min"]
            self.cap_max[slot] = torch.inf if cap["max"] is None else cap["max"]
        if ablation is None:
            self.ablation_directions[slot] = 0.0
            self.ablation_scales[slot] = 1.0
        else:
            self.ablation_directions[slot] = ablation["vector"].to(self.ablation_directions)
            self.ablation_scales[slot] = ablation["scale"]
        for column, op in enumerate((add, cap, ablation)):
            self.op_targets[slot, column] = ops.TARGET_CODES[op["positions"]] if op else 0
