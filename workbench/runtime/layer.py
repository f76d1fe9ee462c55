"""The decoder-layer wrapper that runs inside vLLM's forward pass.

``SteeredDecoderLayer`` wraps one vLLM decoder layer and runs its steering
operator (``workbench.runtime.layer_op``) on the layer's output stream, read
and handed on by the layer's convention (``layer_conventions``). The
operator reads the layer's ``LayerTables``: views of the per-slot tables, and
the per-token slot index, row codes and capture flag that the worker fills
before every step, all in place, so the same code serves eager mode,
torch.compile and CUDA graphs: nothing here branches on data.

In eager mode (no torch.compile, no CUDA graphs) Python runs at every step,
so a ``StepPlan`` written by the worker before each step lets a layer skip the
ops no request of the step uses, the capture write when nobody captures it,
and the inf/NaN watch before the first steered layer: a loaded but idle
runtime then costs one attribute check per layer. Compiled engines always
take the full path, which has no data-dependent branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workbench.runtime.layer_conventions import LayerConvention
from workbench.runtime.layer_op import FULL_USE, NO_USE, LayerUse, fused_kernel, steer_rows_torch
from workbench.runtime.steering_tables import LayerTables


@dataclass
class StepPlan:
    """What the step about to run needs from each layer (read only in eager mode)."""

    eager: bool
    layer_ops: dict[int, LayerUse] = field(default_factory=dict)
    """Layer -> what the requests of the step use there."""
    capture_layers: frozenset[int] = frozenset()
    watch_from: int | None = None
    """First layer steered in the step: it and every layer after it watch the
    steered rows for inf/NaN (a stream pushed too far breaks a few layers later)."""


class SteeredDecoderLayer(nn.Module):
    """A decoder layer followed by the steering ops and a capture write.

    The layer's output is read as the residual stream after the layer (HF
    ``hidden_states[i + 1]``) by its ``convention``, steered, and handed on in
    the layer's own form, so that the next layer sees exactly the steered
    stream and an unsteered token exactly what vLLM would have passed on.
    """

    def __init__(
        self,
        inner: nn.Module,
        index: int,
        convention: LayerConvention,
        plan: StepPlan,
        tables: LayerTables,
        nonfinite_rows: Tensor,
        max_tokens: int,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.convention = convention
        self.plan = plan
        # Buffers, so torch.compile treats them as the model's own tensors (graph inputs, not constants).
        for name, table in tables._asdict().items():
            self.register_buffer(name, table, persistent=False)
        self.register_buffer("nonfinite_rows", nonfinite_rows, persistent=False)
        hidden = tables.add_vectors.shape[-1]
        kw: dict[str, Any] = {"dtype": tables.add_vectors.dtype, "device": tables.add_vectors.device}
        self.register_buffer("captured", torch.zeros(max_tokens, hidden, **kw), persistent=False)
        self._kernel = fused_kernel(self.captured.device)

    def tables(self) -> LayerTables:
        return LayerTables._make(getattr(self, name) for name in LayerTables._fields)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.inner(*args, **kwargs)
        plan = self.plan
        if plan.eager:
            use = plan.layer_ops.get(self.index)
            capture = self.index in plan.capture_layers
            watch = plan.watch_from is not None and self.index >= plan.watch_from
            if use is None and not capture and not watch:
                return output
        else:
            use, capture, watch = FULL_USE, True, True
        out, residual = self.convention.split(output)
        return self.convention.join(output, self._steer(out, residual, use or NO_USE, capture, watch))

    def _steer(self, out: Tensor, residual: Tensor | None, use: LayerUse, capture: bool, watch: bool) -> Tensor:
        tables, marks = self.tables(), self.nonfinite_rows
        if self._kernel is None:
            # No fused kernel (CPU): the torch code, inline for torch.compile to fuse.
            steered = steer_rows_torch(out, residual, tables, self.captured, marks, self.index, capture, use, watch)
        elif self.plan.eager:
            steered = self._kernel(out, residual, tables, self.captured, marks, self.index, capture)
        else:
            # The fused kernel as a custom op: one opaque call for torch.compile,
            # writing the capture buffer and the marks in place.
            steered = torch.ops.workbench.steer_rows(
                out, residual, list(tables), self.captured, marks, self.index, capture
            )
        return steered
