"""SteeringTables: batched slot writes for all layers (no engine)."""

from __future__ import annotations

import torch

from workbench.layer import ALIGNMENT_BYTES, SteeredDecoderLayer, SteeringTables, StepPlan
from workbench.ops import TARGET_CODES


def test_a_batch_of_slot_writes_sets_each_row_and_resets_others_to_neutral():
    tables = SteeringTables.create(layers=3, num_slots=4, hidden=5, dtype=torch.float32, device=torch.device("cpu"))
    add, cap, ablation = torch.arange(5.0), torch.ones(5), torch.full((5,), 2.0)
    tables.write(
        places=[0, 2, 1],
        slots=[1, 1, 3],
        entries=[
            {"add": {"vector": add, "positions": "generated"}},
            {
                "projection_cap": {"vector": cap, "min": None, "max": 3.0, "positions": "all"},
                "ablation": {"vector": ablation, "scale": 0.5, "positions": "prompt"},
            },
            {"add": {"vector": -add, "positions": "all"}},
        ],
    )
    assert torch.equal(tables.add_vectors[0, 1], add) and torch.equal(tables.add_vectors[1, 3], -add)
    assert tables.op_targets[0, 1].tolist() == [TARGET_CODES["generated"], 0, 0]
    assert torch.equal(tables.cap_directions[2, 1], cap)
    assert tables.cap_min[2, 1].item() == -torch.inf and tables.cap_max[2, 1].item() == 3.0
    assert torch.equal(tables.ablation_directions[2, 1], ablation) and tables.ablation_scales[2, 1].item() == 0.5
    assert tables.op_targets[2, 1].tolist() == [0, TARGET_CODES["all"], TARGET_CODES["prompt"]]
    untouched = tables.add_vectors.clone()
    untouched[0, 1] = untouched[1, 3] = 0
    assert not untouched.any()  # nothing else was written

    tables.write(places=[2, 0], slots=[1, 1], entries=[None, None])  # back to neutral
    neutral = SteeringTables.create(3, 4, 5, torch.float32, torch.device("cpu"))
    for name, table in vars(tables).items():
        expected = getattr(neutral, name).clone()
        expected[1, 3] = table[1, 3]  # the row not reset
        assert torch.equal(table, expected), name


def test_layers_hold_views_of_the_stacked_tables():
    tables = SteeringTables.create(layers=2, num_slots=2, hidden=3, dtype=torch.float32, device=torch.device("cpu"))
    view = tables.of_layer(1)["add_vectors"]
    tables.write(places=[1], slots=[2], entries=[{"add": {"vector": torch.ones(3), "positions": "all"}}])
    assert torch.equal(view[2], torch.ones(3))


def test_every_layer_view_starts_aligned_for_torch_compile():
    """Compiled code clones misaligned inputs at every call (five copies per
    layer and step, seen on an H200): each layer's buffers must start aligned."""
    layers, max_tokens = 11, 8
    tables = SteeringTables.create(layers, num_slots=5, hidden=6, dtype=torch.bfloat16, device=torch.device("cpu"))
    flags = torch.zeros(layers, ALIGNMENT_BYTES, dtype=torch.int8)
    slot_index, phases = torch.zeros(max_tokens, dtype=torch.long), torch.zeros(max_tokens, 1, dtype=torch.int8)
    plan = StepPlan(eager=False)
    for place in range(layers):
        layer = SteeredDecoderLayer(
            torch.nn.Identity(), place, plan, tables, place, slot_index, phases, flags, max_tokens
        )
        misaligned = [name for name, buffer in layer.named_buffers() if buffer.data_ptr() % ALIGNMENT_BYTES]
        assert not misaligned, (place, misaligned)
        assert layer.cap_min.shape[0] > 5  # slot rows 0..5 and padding
