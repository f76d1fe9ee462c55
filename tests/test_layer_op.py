"""The custom op ``workbench::steer_rows`` under torch.compile: its writes into
the capture buffer and the inf/NaN marks must reach the module's buffers
(they are declared mutated), and it must give what its torch implementation
gives. Runs on CPU, where the op's kernel is that torch implementation; the
CUDA kernel is compared in test_gpu.py."""

from __future__ import annotations

import numpy as np
import torch

from workbench import AddSpec, LayerSteeringSpec, ProjectionCapSpec
from workbench.ops import row_codes
from workbench.runtime.layer_op import steer_rows_torch
from workbench.runtime.steering_tables import NO_LAYER, LayerTables, SteeringTables

LAYER = 7


class Steered(torch.nn.Module):
    """A layer's tables, step inputs, capture buffer and marks as buffers, as in SteeredDecoderLayer."""

    def __init__(self, hidden: int, max_rows: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        tables = SteeringTables.create(1, 3, hidden, torch.float32, torch.device("cpu"))
        direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
        entries = [
            LayerSteeringSpec(add=AddSpec(torch.randn(hidden), positions="generated")),
            LayerSteeringSpec(projection_cap=ProjectionCapSpec(direction, min=-0.1, max=0.1)),
            LayerSteeringSpec(add=AddSpec(torch.full((hidden,), 3e38))),  # beside a stream of 3e38: inf
        ]
        tables.write([0, 0, 0], [1, 2, 3], entries)
        slot_index = torch.arange(max_rows) % 3  # slot 3 only where a test asks for it
        codes = torch.from_numpy(row_codes(np.arange(max_rows) % 7, prompt_length=4))
        layer = tables.of_layer(0, slot_index, codes, torch.ones(1, dtype=torch.int8))
        for name, table in layer._asdict().items():
            self.register_buffer(name, table)
        self.register_buffer("captured", torch.zeros(max_rows, hidden))
        self.register_buffer("marks", torch.full((max_rows,), NO_LAYER, dtype=torch.int32))

    def tables(self) -> LayerTables:
        return LayerTables._make(getattr(self, name) for name in LayerTables._fields)

    def forward(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        steered = torch.ops.workbench.steer_rows(
            out, residual, list(self.tables()), self.captured, self.marks, LAYER, True
        )
        return steered * 2


@torch.inference_mode()
def test_compiled_custom_op_writes_the_capture_buffer_and_marks():
    module = Steered(hidden=16, max_rows=32)
    module.slot_index[4] = 3  # one row whose add overflows float32
    buffer = module.captured
    compiled = torch.compile(module, dynamic=True)
    for rows in (5, 9):
        out, residual = torch.randn(rows, 16), torch.randn(rows, 16)
        out[4] = 3e38
        marks = torch.full((32,), NO_LAYER, dtype=torch.int32)
        expected = steer_rows_torch(out, residual, module.tables(), torch.zeros(32, 16), marks, LAYER, True)
        result = compiled(out, residual)
        torch.testing.assert_close(result, expected * 2, rtol=0, atol=0, equal_nan=True)
        assert not expected[4].isfinite().any()
        assert module.captured is buffer
        torch.testing.assert_close(buffer[:rows], expected, rtol=0, atol=0, equal_nan=True)
        assert module.marks[:rows].tolist() == marks[:rows].tolist()
        assert module.marks[:rows].tolist() == [NO_LAYER] * 4 + [LAYER] + [NO_LAYER] * (rows - 5)
    assert not torch.equal(expected, out + residual)  # the ops did something


def test_marks_keep_the_lowest_layer_and_skip_unsteered_rows():
    tables = SteeringTables.create(1, 1, 4, torch.float32, torch.device("cpu"))
    tables.write([0], [1], [LayerSteeringSpec(add=AddSpec(torch.ones(4)))])
    slot_index = torch.tensor([0, 1, 1])
    codes = torch.from_numpy(row_codes(np.arange(3), prompt_length=3))
    layer = tables.of_layer(0, slot_index, codes, torch.ones(1, dtype=torch.int8))
    marks = torch.full((3,), NO_LAYER, dtype=torch.int32)
    stream = torch.tensor([[float("nan")] * 4, [float("inf")] * 4, [0.0] * 4])
    for index in (5, 3, 9):
        steer_rows_torch(stream, torch.zeros(3, 4), layer, torch.zeros(3, 4), marks, index, False)
    # The unsteered row (slot 0) is not steering's doing; the finite row is fine.
    assert marks.tolist() == [NO_LAYER, 3, NO_LAYER]
