"""SteeringTables: batched slot writes for all layers (no engine)."""

from __future__ import annotations

import torch

from workbench import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec
from workbench.ops import OP_NAMES, TARGET_CODES
from workbench.runtime.layer import SteeredDecoderLayer, StepPlan
from workbench.runtime.layer_conventions import PAIR_SUM
from workbench.runtime.steering_tables import ALIGNMENT_BYTES, NO_LAYER, LayerTables, SteeringTables

CPU = torch.device("cpu")


def test_a_batch_of_slot_writes_sets_each_row_and_resets_others_to_neutral():
    tables = SteeringTables.create(layers=3, num_slots=4, hidden=5, dtype=torch.float32, device=CPU)
    add, cap = torch.arange(5.0), torch.ones(5) / 5**0.5
    ablation = torch.full((5,), 2.0)
    tables.write(
        places=[0, 2, 1],
        slots=[1, 1, 3],
        entries=[
            LayerSteeringSpec(add=AddSpec(add, positions="generated")),
            LayerSteeringSpec(
                projection_cap=ProjectionCapSpec(cap, max=3.0),
                ablation=AblationSpec(ablation, scale=0.5, positions="prompt"),
            ),
            LayerSteeringSpec(add=AddSpec(add, scale=-1.0)),
        ],
    )
    assert torch.equal(tables.add_vectors[0, 1], add) and torch.equal(tables.add_vectors[1, 3], -add)
    assert tables.op_targets[0, 1].tolist() == [TARGET_CODES["generated"], 0, 0]
    assert torch.allclose(tables.cap_directions[2, 1], cap)
    assert tables.cap_min[2, 1].item() == -torch.inf and tables.cap_max[2, 1].item() == 3.0
    assert torch.allclose(tables.ablation_directions[2, 1], ablation / ablation.norm())
    assert tables.ablation_scales[2, 1].item() == 0.5
    columns = {name: column for column, name in enumerate(OP_NAMES)}
    assert tables.op_targets[2, 1, columns["ablation"]].item() == TARGET_CODES["prompt"]
    assert tables.op_targets[2, 1, columns["projection_cap"]].item() == TARGET_CODES["all"]
    untouched = tables.add_vectors.clone()
    untouched[0, 1] = untouched[1, 3] = 0
    assert not untouched.any()  # nothing else was written

    tables.write(places=[2, 0], slots=[1, 1], entries=[None, None])  # back to neutral
    neutral = SteeringTables.create(3, 4, 5, torch.float32, CPU)
    for name, table in vars(tables).items():
        expected = getattr(neutral, name).clone()
        expected[1, 3] = table[1, 3]  # the row not reset
        assert torch.equal(table, expected), name


def step_inputs(layers: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slot_index = torch.zeros(max_tokens, dtype=torch.long)
    codes = torch.zeros(max_tokens, 3, dtype=torch.int16)
    flags = torch.zeros(layers, ALIGNMENT_BYTES, dtype=torch.int8)
    return slot_index, codes, flags


def test_layers_hold_views_of_the_stacked_tables():
    tables = SteeringTables.create(layers=2, num_slots=2, hidden=3, dtype=torch.float32, device=CPU)
    slot_index, phases, flags = step_inputs(2, 4)
    view = tables.of_layer(1, slot_index, phases, flags[1, :1])
    assert isinstance(view, LayerTables) and view.slot_index is slot_index
    tables.write(places=[1], slots=[2], entries=[LayerSteeringSpec(add=AddSpec(torch.ones(3)))])
    assert torch.equal(view.add_vectors[2], torch.ones(3))


def test_every_layer_view_starts_aligned_for_torch_compile():
    """Compiled code clones misaligned inputs at every call (five copies per
    layer and step, seen on an H200): each layer's buffers must start aligned."""
    layers, max_tokens = 11, 8
    tables = SteeringTables.create(layers, num_slots=5, hidden=6, dtype=torch.bfloat16, device=CPU)
    slot_index, phases, flags = step_inputs(layers, max_tokens)
    marks = torch.full((max_tokens,), NO_LAYER, dtype=torch.int32)
    plan = StepPlan(eager=False)
    for place in range(layers):
        layer_tables = tables.of_layer(place, slot_index, phases, flags[place, :1])
        layer = SteeredDecoderLayer(torch.nn.Identity(), place, PAIR_SUM, plan, layer_tables, marks, max_tokens)
        misaligned = [name for name, buffer in layer.named_buffers() if buffer.data_ptr() % ALIGNMENT_BYTES]
        assert not misaligned, (place, misaligned)
        assert layer.cap_min.shape[0] > 5  # slot rows 0..5 and padding
