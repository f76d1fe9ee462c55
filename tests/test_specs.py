"""Spec validation, equality and round trips (no engine)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import (
    AblationSpec,
    AddSpec,
    HiddenSizeError,
    LayerIndexError,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SpecError,
    SteeringSpec,
)


def sample_spec(hidden: int = 8) -> SteeringSpec:
    g = torch.Generator().manual_seed(0)
    return SteeringSpec(
        {
            2: LayerSteeringSpec(add=AddSpec(torch.randn(hidden, generator=g), scale=3.0)),
            5: LayerSteeringSpec(
                add=AddSpec(torch.randn(hidden, generator=g)),
                projection_cap=ProjectionCapSpec(torch.randn(hidden, generator=g), min=-1.0, max=None),
                ablation=AblationSpec(torch.randn(hidden, generator=g), scale=0.25),
            ),
        }
    )


def test_directions_are_normalised_and_add_keeps_its_vector():
    vector = torch.tensor([3.0, 4.0])
    assert torch.allclose(ProjectionCapSpec(vector, min=0, max=1).vector, torch.tensor([0.6, 0.8]))
    assert torch.allclose(AblationSpec(vector).vector, torch.tensor([0.6, 0.8]))
    add = AddSpec(vector, scale=2.0)
    assert torch.equal(add.vector, vector)
    assert torch.equal(add.effect, vector * 2)


def test_specs_copy_their_vectors():
    vector = torch.ones(4)
    add = AddSpec(vector)
    vector.mul_(5)
    assert torch.equal(add.vector, torch.ones(4))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AddSpec(torch.tensor([1.0, float("nan")])), "non-finite value nan at index 1"),
        (lambda: AddSpec(torch.tensor([1.0, float("inf")])), "non-finite"),
        (lambda: AddSpec(torch.ones(2, 2)), "shape (2, 2)"),
        (lambda: AddSpec(torch.tensor([1, 2])), "floating dtype"),
        (lambda: AddSpec(torch.ones(3), scale=float("inf")), "AddSpec.scale must be finite"),
        (lambda: AddSpec("abc"), "AddSpec.vector"),
        (lambda: ProjectionCapSpec(torch.zeros(3), min=0, max=1), "norm 0.0"),
        (lambda: ProjectionCapSpec(torch.ones(3), min=2, max=1), "min (2.0) is greater than max (1.0)"),
        (lambda: ProjectionCapSpec(torch.ones(3)), "needs min, max or both"),
        (lambda: AblationSpec(torch.zeros(3)), "norm 0.0"),
        (lambda: AblationSpec(torch.ones(3), scale=float("nan")), "AblationSpec.scale must be finite"),
        (lambda: LayerSteeringSpec(add=AblationSpec(torch.ones(3))), "must be a AddSpec"),
        (lambda: SteeringSpec({-1: LayerSteeringSpec(add=AddSpec(torch.ones(3)))}), "got -1"),
        (lambda: SteeringSpec({"2": LayerSteeringSpec(add=AddSpec(torch.ones(3)))}), "got '2'"),
        (lambda: SteeringSpec({1: AddSpec(torch.ones(3))}), "must map to a LayerSteeringSpec"),
    ],
)
def test_bad_values_raise_spec_errors_naming_them(make, message):
    with pytest.raises(SpecError) as info:
        make()
    assert message in str(info.value)


def test_mixed_hidden_sizes_are_rejected():
    with pytest.raises(HiddenSizeError, match=r"\[3, 4\]"):
        SteeringSpec(
            {0: LayerSteeringSpec(add=AddSpec(torch.ones(3))), 1: LayerSteeringSpec(add=AddSpec(torch.ones(4)))}
        )


def test_validate_for_names_layer_and_size():
    spec = sample_spec()
    with pytest.raises(LayerIndexError, match="layer 5 is out of range for a model with 4 layers"):
        spec.validate_for(hidden_size=8, layer_count=4)
    with pytest.raises(HiddenSizeError, match="size 8, the model's hidden size is 576"):
        spec.validate_for(hidden_size=576, layer_count=30)
    spec.validate_for(hidden_size=8, layer_count=30)


def test_empty_layers_are_dropped_and_equality_is_by_content():
    spec = sample_spec()
    assert SteeringSpec({**spec.layers, 7: LayerSteeringSpec()}) == spec
    assert SteeringSpec().is_empty()
    assert sample_spec() == spec and hash(sample_spec()) == hash(spec)
    assert spec.with_layer(2, add=None) != spec
    assert 2 not in spec.with_layer(2, add=None).layers


def test_dict_round_trip_is_json_able():
    spec = sample_spec()
    data = json.loads(json.dumps(spec.to_dict()))
    assert SteeringSpec.from_dict(data) == spec


def test_dict_round_trip_with_base64_vectors_is_exact_and_smaller():
    spec = sample_spec(hidden=576)
    data = json.loads(json.dumps(spec.to_dict(vector_format="base64")))
    assert isinstance(data["layers"]["2"]["add"]["vector"], str)
    assert SteeringSpec.from_dict(data) == spec
    assert len(json.dumps(data)) * 3 < len(json.dumps(spec.to_dict()))
    mixed = spec.to_dict()
    mixed["layers"]["5"]["ablation"] = data["layers"]["5"]["ablation"]  # lists and base64 in one dict
    assert SteeringSpec.from_dict(mixed) == spec
    with pytest.raises(SpecError, match="vector_format"):
        spec.to_dict(vector_format="hex")


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        ("not base64!", "layer '1' op 'add' vector is a string but not valid base64"),
        ("AAAAAAA=", "decodes to 5 bytes"),
        ("AADAfw==", "layer '1' op 'add': AddSpec.vector has a non-finite value nan at index 0"),
    ],
)
def test_bad_base64_vectors_name_the_layer_and_op(vector, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        SteeringSpec.from_dict({"layers": {"1": {"add": {"vector": vector}}}})


def test_safetensors_round_trip(tmp_path):
    spec = sample_spec()
    path = spec.save(tmp_path / "sub" / "spec.safetensors")
    assert SteeringSpec.load(path) == spec
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable steering spec file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable steering spec file"),
    ],
)
def test_malformed_files_raise_spec_errors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SpecError, match=message):
        SteeringSpec.load(path)


def test_truncated_file_raises_spec_error(tmp_path):
    path = sample_spec().save(tmp_path / "spec.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(SpecError):
        SteeringSpec.load(path)


def test_missing_file_raises_spec_error(tmp_path):
    with pytest.raises(SpecError, match="missing.safetensors"):
        SteeringSpec.load(tmp_path / "missing.safetensors")


def test_from_dict_rejects_unknown_ops():
    with pytest.raises(SpecError, match="unknown ops"):
        SteeringSpec.from_dict({"layers": {"1": {"steer": {"vector": [1.0]}}}})


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
vectors = st.lists(finite, min_size=2, max_size=16).filter(lambda v: math.hypot(*v) > 1e-3)


@settings(max_examples=60, deadline=None)
@given(vector=vectors, low=finite, width=st.floats(min_value=0, max_value=100), scale=finite)
def test_property_valid_specs_round_trip(vector, low, width, scale):
    spec = SteeringSpec(
        {
            0: LayerSteeringSpec(
                add=AddSpec(vector, scale=scale),
                projection_cap=ProjectionCapSpec(vector, min=low, max=low + width),
                ablation=AblationSpec(vector, scale=scale),
            )
        }
    )
    assert SteeringSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert torch.isclose(spec.layers[0].ablation.vector.norm(), torch.tensor(1.0))


def test_positions_are_validated_and_round_trip(tmp_path):
    with pytest.raises(SpecError, match="AddSpec.positions must be one of"):
        AddSpec(torch.ones(3), positions="middle")
    spec = SteeringSpec(
        {
            1: LayerSteeringSpec(
                add=AddSpec(torch.ones(3), positions="generated"),
                ablation=AblationSpec(torch.ones(3), positions="prompt"),
            )
        }
    )
    assert SteeringSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert SteeringSpec.load(spec.save(tmp_path / "s.safetensors")) == spec
    assert spec != SteeringSpec(
        {1: LayerSteeringSpec(add=AddSpec(torch.ones(3)), ablation=AblationSpec(torch.ones(3), positions="prompt"))}
    )
    assert "positions=generated" in repr(spec)


def test_values_the_residual_stream_cannot_hold_are_refused_naming_the_range():
    from workbench import DtypeRangeError

    fine = SteeringSpec({0: LayerSteeringSpec(add=AddSpec(torch.full((576,), 1e17)))})
    fine.validate_for(576, 4, torch.float32)  # norm 2.4e18: within what the next norm can square
    too_long = SteeringSpec({0: LayerSteeringSpec(add=AddSpec(torch.full((576,), 1e18)))})
    with pytest.raises(DtypeRangeError, match=r"layer 0: the added vector's norm is 2.4e\+19.*at most 1.84e\+19"):
        too_long.validate_for(576, 4, torch.bfloat16)
    half = SteeringSpec({0: LayerSteeringSpec(add=AddSpec(torch.full((576,), 7e4)))})
    half.validate_for(576, 4, torch.float32)
    with pytest.raises(DtypeRangeError, match=r"index 0 is 7e\+04.*float16's largest value is 6.55e\+04"):
        half.validate_for(576, 4, torch.float16)
    cap = SteeringSpec({2: LayerSteeringSpec(projection_cap=ProjectionCapSpec(torch.ones(576), max=1e20))})
    with pytest.raises(DtypeRangeError, match="layer 2: the cap's max is 1e"):
        cap.validate_for(576, 4, torch.float32)
    with pytest.raises(DtypeRangeError, match="overflows float32"):
        AddSpec(torch.full((576,), 1e30), scale=1e10)
