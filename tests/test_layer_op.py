"""The custom op ``workbench::steer_rows`` under torch.compile: its write into
the capture buffer must reach the module's buffer (it is declared mutated),
and it must give what its torch implementation gives. Runs on CPU, where the op's kernel
is that torch implementation; the CUDA kernel is compared in test_gpu.py."""

from __future__ import annotations

import torch

from workbench.layer import SteeringTables
from workbench.layer_op import steer_rows_torch


class Steered(torch.nn.Module):
    """A layer's tables, slot index, phases and capture buffer as buffers, as in SteeredDecoderLayer."""

    def __init__(self, hidden: int, max_rows: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        tables = SteeringTables.create(1, 2, hidden, torch.float32, torch.device("cpu"))
        direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
        entries = [
            {"add": {"vector": torch.randn(hidden), "positions": "generated"}},
            {"projection_cap": {"vector": direction, "min": -0.1, "max": 0.1, "positions": "all"}},
        ]
        tables.write([0, 0], [1, 2], entries)
        for name, table in tables.of_layer(0).items():
            self.register_buffer(name, table)
        self.register_buffer("slot_index", torch.arange(max_rows) % 3)
        self.register_buffer("row_phases", (1 + torch.arange(max_rows) % 2).to(torch.int8)[:, None])
        self.register_buffer("captured", torch.zeros(max_rows, hidden))
        self.register_buffer("capture_flag", torch.ones(1, dtype=torch.int8))

    def tables(self) -> tuple[torch.Tensor, ...]:
        names = ("slot_index", "row_phases", "add_vectors", "cap_directions", "cap_min", "cap_max")
        names += ("ablation_directions", "ablation_scales", "op_targets", "captured", "capture_flag")
        return tuple(getattr(self, name) for name in names)

    def forward(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        steered = torch.ops.workbench.steer_rows(out, residual, *self.tables(), True)
        return steered * 2


@torch.inference_mode()
def test_compiled_custom_op_writes_the_capture_buffer():
    module = Steered(hidden=16, max_rows=32)
    buffer = module.captured
    compiled = torch.compile(module, dynamic=True)
    for rows in (5, 9):
        out, residual = torch.randn(rows, 16), torch.randn(rows, 16)
        expected = steer_rows_torch(
            out, residual, *module.tables()[:-2], torch.zeros(32, 16), module.capture_flag, True
        )
        result = compiled(out, residual)
        assert torch.equal(result, expected * 2)
        assert module.captured is buffer and torch.equal(buffer[:rows], expected)
    assert not torch.equal(expected, out + residual)  # the ops did something
