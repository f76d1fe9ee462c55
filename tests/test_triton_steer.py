"""The fused Triton kernel against the torch path of the same operator.

Runs where Triton can launch: on CUDA, or on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, with a Triton installed beside torch)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from workbench import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec
from workbench.ops import TARGET_CODES, row_codes
from workbench.runtime.layer_op import steer_rows_torch
from workbench.runtime.steering_tables import NO_LAYER, SteeringTables

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRETED):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIDDEN, ROWS = (4096, 300) if DEVICE.type == "cuda" else (256, 40)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
"""The interpreter emulates bfloat16 with other rounding; it checks the float32 kernel."""


def test_triton_kernel_matches_the_torch_path():
    """The fused kernel computes ``ops.apply_layer_ops`` as the torch path does:
    bit for bit on neutral and add-only rows, within a rounding step with cap and
    ablation; the capture buffer gets exactly the output, and nothing while
    the layer's capture flag is off; steered rows that overflow are marked
    with the layer, unsteered ones never."""
    from workbench.runtime.triton_steer import steer_rows

    torch.manual_seed(0)
    device, hidden, rows = DEVICE, HIDDEN, ROWS
    tables = SteeringTables.create(1, 5, hidden, DTYPE, device)

    def unit() -> torch.Tensor:
        vector = torch.randn(hidden)
        return vector / vector.norm()

    targets = ["all", "prompt", "generated", "user", 1]
    entries = [
        LayerSteeringSpec(
            add=AddSpec(torch.randn(hidden), positions=targets[slot % 5]),
            projection_cap=ProjectionCapSpec(unit(), min=-0.5, max=0.3, positions=targets[(slot + 1) % 5]),
            ablation=AblationSpec(unit(), scale=0.3 * slot, positions=targets[(slot + 2) % 5]),
        )
        for slot in range(1, 4)
    ] + [
        LayerSteeringSpec(add=AddSpec(torch.randn(hidden))),
        LayerSteeringSpec(add=AddSpec(torch.full((hidden,), 3e38))),
    ]
    tables.write([0] * 5, [1, 2, 3, 4, 5], entries)
    out = torch.randn(rows, hidden, dtype=DTYPE, device=device) * 4
    residual = torch.randn(rows, hidden, dtype=DTYPE, device=device) * 4
    out[[7, 8]] = 3e38  # rows of slot 5, whose add then overflows
    slots = torch.arange(rows + 8, device=device) % 5  # slots 0..4; slot 5 on two rows below
    slots[[7, 8]] = 5
    # Rows alternate between stretches of prompt and of generated tokens, in a chat of three messages.
    row_positions = np.arange(rows + 8) % 37
    spans = [(0, 5, TARGET_CODES["system"]), (5, 12, TARGET_CODES["user"]), (12, 20, TARGET_CODES["user"])]
    phases = torch.from_numpy(row_codes(row_positions, prompt_length=20, messages=spans)).to(device)
    flag_on, flag_off = torch.ones(1, dtype=torch.int8, device=device), torch.zeros(1, dtype=torch.int8, device=device)
    layer_on = tables.of_layer(0, slots, phases, flag_on)
    layer_off = tables.of_layer(0, slots, phases, flag_off)
    captured = torch.zeros(rows + 8, hidden, dtype=DTYPE, device=device)

    def marks() -> torch.Tensor:
        return torch.full((rows + 8,), NO_LAYER, dtype=torch.int32, device=device)

    expected_marks, result_marks = marks(), marks()
    expected = steer_rows_torch(out, residual, layer_on, torch.empty_like(captured), expected_marks, 6, True)
    result = steer_rows(out, residual, layer_on, captured, result_marks, 6, True)
    untouched = torch.zeros_like(captured)
    again = steer_rows(out, residual, layer_off, untouched, marks(), 6, True)
    assert torch.equal(again.isnan(), result.isnan()) and torch.equal(again.nan_to_num(), result.nan_to_num())

    assert not untouched.any()  # the layer's flag is off: no capture write
    assert torch.equal(captured[:rows].nan_to_num(), result.nan_to_num()) and not captured[rows:].any()
    broken = slots[:rows] == 5
    assert result_marks[:rows].tolist() == expected_marks[:rows].tolist()
    assert result_marks[:rows][broken].tolist() == [6, 6] and (result_marks[:rows][~broken] == NO_LAYER).all()
    exact = (slots[:rows] % 4 == 0) & ~broken  # slot 0 (neutral) and slot 4 (add only)
    assert torch.equal(result[exact], expected[exact])
    assert torch.equal(result[slots[:rows] == 0], (out + residual)[slots[:rows] == 0])
    fine = ~broken
    assert torch.allclose(result[fine].float(), expected[fine].float(), rtol=0.02, atol=0.1)
    assert (result[fine & ~exact] != (out + residual)[fine & ~exact]).any()

    # Layers that return the stream itself pass no residual.
    stream = (out + residual).contiguous()
    alone = steer_rows(stream, None, layer_off, torch.zeros_like(captured), marks(), 6, True)
    assert torch.equal(alone.nan_to_num(), result.nan_to_num())
