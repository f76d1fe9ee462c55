"""Widget panels driven as a user would (set values, click), on a real engine; no browser."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from tests.conftest import ENGINE_SETTINGS
from workbench import (
    AblationSpec,
    AddSpec,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SpecError,
    SteeringSpec,
    VLLMSteeringConfig,
)
from workbench.notebook import Workbench, get_engine, shutdown_engine
from workbench.notebook.panels import RowState, rows_to_spec
from workbench.vector_library import VectorLibrary


def test_rows_to_spec_builds_the_described_ops(tmp_path):
    library = VectorLibrary(tmp_path)
    library.save("v", torch.arange(1.0, 7.0))
    rows = [
        RowState(layer=2, op="add", seed=3, scale=5.0),
        RowState(layer=2, op="projection_cap", source="library", vector_name="v", cap_range=(-1.0, 2.0)),
        RowState(layer=4, op="ablation", seed=1, scale=0.0),
        RowState(layer=9, op="add", enabled=False),
    ]
    spec = rows_to_spec(rows, hidden_size=6, library=library)
    assert sorted(spec.layers) == [2, 4]
    add = spec.layers[2].add
    expected = torch.randn(6, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(add.effect, expected / expected.norm() * 5.0)
    cap = spec.layers[2].projection_cap
    assert (cap.min, cap.max) == (-1.0, 2.0)
    assert torch.allclose(cap.vector, torch.arange(1.0, 7.0) / torch.arange(1.0, 7.0).norm())
    assert spec.layers[4].ablation.scale == 0.0
    with pytest.raises(SpecError, match="no vector named 'missing'"):
        rows_to_spec([RowState(layer=1, source="library", vector_name="missing")], 6, library)
    # Two rows with one layer and op are refused, not merged (the first used to be dropped silently).
    with pytest.raises(SpecError, match="two rows set 'add' on layer 2"):
        rows_to_spec([RowState(layer=2, scale=120.0), RowState(layer=2, scale=-50.0)], 6, library)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    engine = get_engine(VLLMSteeringConfig(**{**ENGINE_SETTINGS, "max_steering_slots": 4}))
    yield Workbench(engine, plot_layer=6, library_dir=tmp_path_factory.mktemp("vectors"))
    shutdown_engine()


@pytest.mark.slow
def test_steering_editor_applies_and_chat_compares(bench, tmp_path):
    model = bench.engine.model
    row = bench.steering.add_row(RowState(layer=3))
    row.scale.value = 120.0  # as if the slider moved
    bench.steering.apply().result(60)
    assert model.export_steering_spec() == bench.steering.current_spec()
    assert "3: add(scale=120)" in bench.steering.spec_text.value
    assert bench.steering.status.value == "applied"

    bench.chat.max_tokens.value = 12
    bench.chat.input.value = "Tell me a fact about cats."
    bench.chat.send().result(120)
    turn = bench.chat.turns[-1]
    assert set(turn.replies) == {"baseline", "steered"}
    assert turn.replies["baseline"] != turn.replies["steered"]
    assert "Tell me a fact about cats." in bench.chat.transcript.value
    assert bench.chat.history[-1]["content"] == turn.replies["steered"]
    plots = bench.activations.figures()
    assert [trace.name for trace in plots["layer_norms"].data] == ["baseline", "steered"]
    assert len(plots["layer_norms"].data[0].x) == model.layer_count
    assert len(plots["layer_cosines"].data[0].x) == model.layer_count
    assert len(plots["message_norms"].data) == 2
    assert plots["token_heatmap"].data[0].z is not None

    # Errors in a callback reach the status line, and the panel keeps working.
    bad = bench.steering.add_row(RowState(layer=5, source="library", vector_name="nope"))
    assert bench.steering.apply() is None
    assert "no vector named" in bench.steering.status.value
    bench.steering._remove(bad)

    bench.steering.path.value = str(tmp_path / "spec.safetensors")
    bench.steering.save()
    bench.steering.clear().result(60)
    assert model.export_steering_spec().is_empty()
    bench.steering.load().result(60)
    assert_spec_close(model.export_steering_spec(), rows_to_spec([RowState(layer=3, scale=120.0)], model.hidden_size))


def assert_spec_close(ours: SteeringSpec, expected: SteeringSpec) -> None:
    """Specs rebuilt through editor rows match up to float rounding (add = unit direction x norm)."""
    assert sorted(ours.layers) == sorted(expected.layers)
    for layer, want in expected.layers.items():
        got = ours.layers[layer]
        for op in ("add", "projection_cap", "ablation"):
            a, b = getattr(got, op), getattr(want, op)
            assert (a is None) == (b is None), (layer, op)
            if b is None:
                continue
            assert a.positions == b.positions
            assert torch.allclose(
                a.effect if op == "add" else a.vector, b.effect if op == "add" else b.vector, atol=1e-5
            )
        if want.projection_cap is not None:
            assert got.projection_cap.min == want.projection_cap.min
        if want.ablation is not None:
            assert got.ablation.scale == pytest.approx(want.ablation.scale)


@pytest.mark.slow
def test_spec_file_session_and_figure_export(bench, tmp_path):
    model = bench.engine.model
    g = torch.Generator().manual_seed(11)
    spec = SteeringSpec(
        {
            2: LayerSteeringSpec(
                add=AddSpec(torch.randn(576, generator=g), scale=2.0, positions="generated"),
                projection_cap=ProjectionCapSpec(torch.randn(576, generator=g), min=-1.0, max=3.0),
            ),
            7: LayerSteeringSpec(ablation=AblationSpec(torch.randn(576, generator=g), scale=0.25)),
        }
    )
    spec.save(tmp_path / "mine.safetensors")
    bench.steering.path.value = str(tmp_path / "mine.safetensors")
    bench.steering.load().result(60)  # a file becomes editor rows, then is applied
    assert [(r.layer.value, r.op.value, r.positions.value) for r in bench.steering.rows] == [
        (2, "add", "generated"),
        (2, "projection_cap", "all"),
        (7, "ablation", "all"),
    ]
    assert_spec_close(model.export_steering_spec(), spec)

    bench.chat.max_tokens.value = 6
    bench.chat.input.value = "Name a colour."
    bench.chat.send().result(120)
    messages = len(bench.chat.history)  # system + earlier turns + the question (the reply is generated)
    assert len(bench.activations.message_cosines.data[0].z) == messages

    folder = tmp_path / "session"
    bench.save_session(folder)
    history, settings = list(bench.chat.history), bench.chat.settings()

    def heatmap_data() -> dict:
        return go.Figure(bench.activations.message_cosines).to_dict()["data"][0]["z"]

    heatmap = heatmap_data()
    bench.chat.reset()
    bench.steering.clear().result(60)
    assert model.export_steering_spec().is_empty()
    bench.load_session(folder).result(60)
    assert bench.chat.history == history and bench.chat.settings() == settings
    assert "Name a colour." in bench.chat.transcript.value
    assert_spec_close(model.export_steering_spec(), spec)
    assert heatmap_data() == heatmap

    paths = bench.export_figures(tmp_path / "figures")
    assert len(paths) == 3 * len(bench.figures()) == 3 * 6
    for path in paths:
        content = path.read_bytes()
        expected = {".png": b"\x89PNG", ".svg": b"<svg", ".html": b"plotly"}[path.suffix]
        assert expected in content[:200] if path.suffix == ".png" else expected in content, path


@pytest.mark.slow
def test_sweep_and_direction_from_captures(bench):
    sweep = bench.sweep
    sweep.layer.value, sweep.scales.value, sweep.max_tokens.value = 3, "0, 8, 32", 6
    sweep.run().result(120)
    assert list(sweep.frame["scale"]) == [0.0, 8.0, 32.0]
    assert sweep.progress.value == 3
    assert list(sweep.figure.data[0].x) == [0.0, 8.0, 32.0]
    assert "<table" in sweep.table.value
    projections = list(sweep.frame["proj_generated_mean"])
    assert projections[2] > projections[0]  # adding more of the direction moves the stream along it
    sweep.scales.value = "a, b"
    assert sweep.run() is None and "scales must be numbers" in sweep.status.value

    contrast = bench.contrast
    contrast.positive.value = "I love this!\nWhat a wonderful day."
    contrast.negative.value = "I hate this.\nWhat an awful day."
    contrast.layer.value, contrast.name.value = 5, "sentiment"
    contrast.make().result(120)
    vector, metadata = bench.steering.library.load("sentiment")
    assert vector.shape == (576,) and metadata["method"] == "mean_diff" and metadata["layer"] == 5
    sweep.vector_name.value, sweep.scales.value = "sentiment", "0, 4"
    sweep.run().result(120)
    assert len(sweep.frame) == 2
