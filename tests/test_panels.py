"""Widget panels driven as a user would (set values, click), on a real engine; no browser."""

from __future__ import annotations

import concurrent.futures
import html
import json
import time

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from tests.conftest import ENGINE_SETTINGS
from workbench import (
    AblationSpec,
    AddSpec,
    LayerIndexError,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SpecError,
    SteeringSpec,
    VLLMSteeringConfig,
)
from workbench.notebook import RowState, Workbench, get_engine, shutdown_engine
from workbench.notebook.conversation import BASELINE, STEERED, STOPPED, Conversation
from workbench.notebook.editor import describe_rows, rows_from_spec, rows_to_spec
from workbench.notebook.plot_widget import PlotWidget, plotly_bundle
from workbench.notebook.residual_norms import cache_path, typical_norms
from workbench.notebook.sweep_panel import explain_row, parse_scales, sweep_prompt
from workbench.notebook.widgets import NumberEntry
from workbench.vector_library import VectorLibrary


def test_rows_to_spec_builds_the_described_ops(tmp_path):
    library = VectorLibrary(tmp_path)
    library.save("v", torch.arange(1.0, 7.0))
    rows = [
        RowState(layer=2, op="add", seed=3, scale=5.0),
        RowState(layer=2, op="projection_cap", vector="v", cap_min=-1.0, cap_max=2.0),
        RowState(layer=4, op="ablation", seed=1, scale=0.0),
        RowState(layer=5, op="add", vector="v", scale=2.0),
        RowState(layer=9, op="add", enabled=False),
    ]
    spec = rows_to_spec(rows, hidden_size=6, library=library)
    assert sorted(spec.layers) == [2, 4, 5]
    add = spec.layers[2].add
    expected = torch.randn(6, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(add.effect, expected / expected.norm() * 5.0)
    cap = spec.layers[2].projection_cap
    assert (cap.min, cap.max) == (-1.0, 2.0)
    unit = torch.arange(1.0, 7.0) / torch.arange(1.0, 7.0).norm()
    assert torch.allclose(cap.vector, unit)
    # A saved vector is a direction: the scale is the norm of what is added, whatever the vector's own norm.
    assert spec.layers[5].add.effect.norm().item() == pytest.approx(2.0)
    assert spec.layers[4].ablation.scale == 0.0


def test_rows_to_spec_refuses_what_it_cannot_apply_as_typed(tmp_path):
    library = VectorLibrary(tmp_path)
    with pytest.raises(SpecError, match="no vector named 'missing'"):
        rows_to_spec([RowState(layer=1, vector="missing")], 6, library)
    # Two rows with one layer and op are refused, not merged (the first used to be dropped silently).
    with pytest.raises(SpecError, match="two rows set 'add' on layer 2"):
        rows_to_spec([RowState(layer=2, scale=120.0), RowState(layer=2, scale=-50.0)], 6, library)
    with pytest.raises(LayerIndexError, match="layer 30 is out of range"):
        rows_to_spec([RowState(layer=30)], 6, library, layer_count=30)
    with pytest.raises(SpecError, match="min .* is greater than max"):
        rows_to_spec([RowState(layer=1, op="projection_cap", cap_min=3.0, cap_max=1.0)], 6, library)
    one_sided = rows_to_spec([RowState(layer=1, op="projection_cap", cap_min=None, cap_max=2.0)], 6, library)
    assert (one_sided.layers[1].projection_cap.min, one_sided.layers[1].projection_cap.max) == (None, 2.0)


def test_a_message_index_target_round_trips_through_the_spec(tmp_path):
    library = VectorLibrary(tmp_path)
    spec = rows_to_spec([RowState(layer=1, scale=3.0, positions=2)], 6, library)
    assert spec.layers[1].add.positions == 2
    assert "<td>message 2</td>" in describe_rows([RowState(layer=1, positions=2)])
    spec.save(tmp_path / "spec.safetensors")
    (state,) = rows_from_spec(SteeringSpec.load(tmp_path / "spec.safetensors"), library, "back")
    assert state.positions == 2 and state.scale == pytest.approx(3.0)


def test_plot_widgets_share_one_copy_of_plotlys_code():
    figure = go.Figure(go.Scatter(y=[1, 3, 2]))
    first, second = PlotWidget(figure), PlotWidget(figure)
    assert isinstance(first, go.FigureWidget) and first.data[0].y == (1, 3, 2)
    bundle = plotly_bundle()
    assert bundle is plotly_bundle() and bundle.bundle == str(go.FigureWidget._esm)
    # Each figure's state holds a small module, not plotly's ~5 MB bundle.
    for widget in (first, second):
        assert len(widget.get_state()["_esm"]) < 10_000 < len(bundle.bundle)
        assert bundle.key in widget.get_state()["_esm"]
    bundle.close()
    assert plotly_bundle() is not bundle  # a closed bundle is replaced, so new figures still load


def test_lens_table_aligns_branches_on_the_end_of_the_prompt():
    from workbench.capture import CaptureHandle, MessageBoundary
    from workbench.notebook.lens_panel import lens_table, row_at, turn_offsets

    handle = CaptureHandle(
        "r", "c", (0,), prompt_token_ids=(1, 2, 3, 4), generated_token_ids=(5, 6, 7),
        message_boundaries=(MessageBoundary("system", "s", 0, 2), MessageBoundary("user", "u", 2, 4)),
    )  # fmt: skip
    assert turn_offsets(handle) == [-2, -1, 0, 1]  # the user message, then the reply rows captured
    assert (row_at(handle, -1), row_at(handle, 1), row_at(handle, 2)) == (3, 5, None)
    table = lens_table(
        [0], {"baseline": None, "steered": [[(9, "<b>", 0.5), (8, " x", 0.25)]]}, {"baseline": "", "steered": ""}
    )
    assert "&lt;b&gt;" in table and "<b>'&lt;b&gt;'&nbsp;0.50</b>" in table and "' x'&nbsp;0.25" in table
    assert "<td>—</td>" in table  # the branch without that token


def test_number_entry_keeps_what_was_typed():
    entry = NumberEntry(4.0, -10.0, 10.0, 0.5, "scale")
    entry.text.value = "nan"
    assert entry.text.value == "nan" and entry.slider.value == 4.0
    with pytest.raises(SpecError, match="scale must be a finite number, got 'nan'"):
        entry.value("scale")
    entry.text.value = "250"  # beyond the slider: the slider widens, the value stays
    assert entry.value("scale") == 250.0 and entry.slider.max == 250.0 and entry.slider.value == 250.0
    entry.slider.value = -3.5
    assert entry.text.value == "-3.5"
    blank = NumberEntry(None, -10.0, 10.0, 0.5, "min", blank=True)
    assert blank.value("min") is None


def test_conversation_branches_keep_their_own_replies():
    conversation = Conversation(compare=True)
    turn = conversation.start("Hi")
    conversation.finish(
        turn,
        {
            BASELINE: {"role": "assistant", "content": "Hello!"},
            STEERED: {"role": "assistant", "content": "the the"},
        },
    )
    baseline, steered = conversation.prompts("Be nice.", "And now?")
    assert baseline[2] == {"role": "assistant", "content": "Hello!"}
    assert steered[2] == {"role": "assistant", "content": "the the"}
    assert baseline[0] == steered[0] == {"role": "system", "content": "Be nice."}
    conversation.start("stopped one").state = STOPPED
    assert len(conversation.histories[BASELINE]) == 2  # a stopped turn is in no history
    again = Conversation.from_dict(json.loads(json.dumps(conversation.to_dict())))
    assert again.histories == conversation.histories and again.turns[-1].state == STOPPED


def test_sweep_states_its_prompt_and_explains_missing_projections():
    assert sweep_prompt("", [], "Hi")[0] == "Hi"
    messages, how = sweep_prompt(
        "Be brief.", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "Hi"
    )
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "Hi"}
    assert "system prompt" in how and "1 earlier turns" in how
    assert "first token generated ended it" in explain_row("", 1, None)
    assert "no projection" in explain_row("Hi", 1, None)
    assert "broke the residual stream at layer 7" in explain_row("zzz", 9, 7)
    assert explain_row("fine", 9, float("nan")) == ""
    with pytest.raises(SpecError, match="finite"):
        parse_scales("1, nan")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("home")))
    engine = get_engine(VLLMSteeringConfig(**{**ENGINE_SETTINGS, "max_steering_slots": 4}))
    bench = Workbench(engine, plot_layer=6)
    bench.norms_future.result(120)
    yield bench
    shutdown_engine()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_typical_norms_are_measured_once_and_cached(bench, tmp_path):
    model = bench.engine.model
    norms = bench.steering.typical
    assert len(norms.medians) == model.layer_count and all(m > 0 for m in norms.medians)
    assert cache_path(model.model_name, "float32").exists()
    assert bench.engine.run(typical_norms(model)) == norms  # read back, not measured again
    assert "typical residual norms" in bench.norms_line.value
    fresh = bench.engine.run(typical_norms(model, refresh=True, folder=tmp_path))
    assert cache_path(model.model_name, "float32", tmp_path).exists()
    assert fresh.medians == pytest.approx(norms.medians, rel=1e-4) and fresh.tokens == norms.tokens


@pytest.mark.slow
def test_editor_applies_names_vectors_and_refuses_bad_input(bench):
    model, steering = bench.engine.model, bench.steering
    row = steering.add_row(RowState(layer=3))
    assert "modified, not applied" in steering.state_label.value
    row.scale.text.value = "120"  # as if typed
    steering.apply().result(60)
    assert "applied" in steering.state_label.value and "modified" not in steering.state_label.value
    assert model.export_steering_spec() == steering.current_spec()
    assert model.export_steering_spec().layers[3].add.effect.norm().item() == pytest.approx(120.0, rel=1e-5)
    assert "random (seed 0)" in steering.spec_text.value and "typical" in steering.spec_text.value
    applied = model.export_steering_spec()

    # Bad input: a message in the status line, nothing applied, the typed value left as it is.
    for widget, typed, message in (
        (row.layer, 99, "layer 99 is out of range"),
        (row.scale.text, "nan", "must be a finite number"),
    ):
        before = widget.value
        widget.value = typed
        assert "modified, not applied" in steering.state_label.value
        assert steering.apply() is None
        assert message in steering.status.value and widget.value == typed
        assert model.export_steering_spec() is applied
        widget.value = before
    twin = steering.add_row(RowState(layer=3, scale=-50.0))
    assert steering.apply() is None and "two rows set" in steering.status.value
    twin.op.value = "projection_cap"
    twin.cap_min.text.value, twin.cap_max.text.value = "5", "1"
    assert steering.apply() is None and "greater than max" in steering.status.value
    twin.cap_min.text.value = ""  # one-sided: only a max
    steering.apply().result(60)
    cap = model.export_steering_spec().layers[3].projection_cap
    assert (cap.min, cap.max) == (None, 1.0)

    # Units: the same steering typed as a multiple of the layer's typical norm.
    typical = steering.typical.at(3)
    steering.unit.value = "typical"
    assert float(row.scale.text.value) == pytest.approx(120.0 / typical, rel=1e-4)
    assert "absolute" in row.units.value
    assert "modified" not in steering.state_label.value  # converting the display changes nothing
    steering.unit.value = "absolute"

    # Clear, then undo it once.
    steering.clear().result(60)
    assert model.export_steering_spec().is_empty() and not steering.rows
    steering.undo_clear().result(60)
    assert len(steering.rows) == 2 and model.export_steering_spec().layers[3].projection_cap is not None
    assert steering.undo_button.disabled and steering.undo_clear() is None
    steering.remove_row(twin)
    steering.apply().result(60)


@pytest.mark.slow
def test_editor_targets_one_message_by_its_index(bench):
    model, steering = bench.engine.model, bench.steering
    before = model.export_steering_spec()
    row = steering.add_row(RowState(layer=5, scale=40.0))
    assert row.message.layout.display == "none"  # the index box shows only for "message #"
    row.positions.value = "message"
    assert row.message.layout.display == ""

    # A bad index: a message naming the row, nothing applied, the typed text left as it is.
    for typed, message in (
        ("", "must be a whole number from 0 to 32751, got ''"),
        ("two", "must be a whole number from 0 to 32751, got 'two'"),
        ("-1", "got '-1'"),
        ("40000", "message index 40000 is outside 0..32751"),
    ):
        row.message.value = typed
        assert "modified, not applied" in steering.state_label.value
        assert steering.apply() is None
        shown = html.unescape(steering.status.value)
        assert "row for layer 5 (add): message index" in shown and message in shown
        assert row.message.value == typed and model.export_steering_spec() is before

    row.message.value = "2"
    steering.apply().result(60)
    applied = model.export_steering_spec()
    assert applied.layers[5].add.positions == 2 and applied.layers[3].add.positions == "all"
    assert applied == steering.current_spec()
    assert "<td>message 2</td>" in steering.spec_text.value
    assert "modified" not in steering.state_label.value

    # The applied spec turned back into a row (as Load does) shows the same target and applies the same spec.
    state = next(s for s in rows_from_spec(applied, bench.library, "message-target") if s.layer == 5)
    steering.remove_row(row)
    again = steering.add_row(state)
    assert (again.positions.value, again.message.value) == ("message", "2")
    steering.apply().result(60)
    assert model.export_steering_spec().layers[5].add.positions == 2

    steering.remove_row(again)
    steering.apply().result(60)
    assert sorted(model.export_steering_spec().layers) == [3]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_compare_branches_stay_independent_and_stream(bench):
    model, chat = bench.engine.model, bench.chat
    chat.reset()
    assert model.export_steering_spec().layers[3].add is not None  # from the editor test
    chat.max_tokens.value = 10
    for text in ("Tell me a fact about cats.", "Why?", "Thanks."):
        chat.input.value = text
        future = chat.send()
        assert chat.send_button.disabled and not chat.stop_button.disabled
        assert text in chat.columns[BASELINE].value  # the user's message shows at once
        future.result(120)
        assert not chat.send_button.disabled
    baseline, steered = chat.history(BASELINE), chat.history(STEERED)
    assert [m["content"] for m in baseline[::2]] == [m["content"] for m in steered[::2]]
    assert baseline[1::2] != steered[1::2]
    # The baseline branch is exactly what the model answers its own unsteered conversation.
    system = [{"role": "system", "content": chat.system.value}]
    expected = bench.engine.run(
        model.chat(system + baseline[:-1], steering_spec=SteeringSpec(), temperature=0.0, max_tokens=10)
    )
    assert expected[0].full_text() == baseline[-1]["content"]
    assert chat.compare.disabled  # fixed until New chat

    plots = bench.activations.figures()
    assert [trace.name for trace in plots["layer_means"].data] == ["baseline", "steered"]
    assert len(plots["layer_means"].data[0].x) == model.layer_count
    assert len(plots["layer_cosines"].data[0].x) == model.layer_count
    assert len(plots["token_heatmap"].data) == 2 and "token %{text}" in plots["token_heatmap"].data[0].hovertemplate
    assert plots["token_heatmap"].data[0].text[0][1].startswith("'")
    saved = plots["layer_means"]._widget_data  # what a reloaded page draws
    assert [trace["name"] for trace in saved] == ["baseline", "steered"] and len(saved[0]["y"]) == model.layer_count
    options = dict(bench.activations.quantity.options)
    assert any("layer 3 add direction (random (seed 0))" in label for label in options)
    bench.activations.quantity.value = next(key for label, key in options.items() if "layer 3 add" in label)
    assert "projection" in plots["token_heatmap"].layout.title.text.lower()
    assert [trace.name for trace in plots["message_means"].data] == ["baseline", "steered"]
    assert "projection on the layer 3 add direction" in plots["message_means"].layout.title.text
    bench.activations.quantity.value = "norm"

    chat.reset()
    assert not chat.history(BASELINE) and not chat.compare.disabled


@pytest.mark.slow
def test_logit_lens_reads_one_token_in_both_branches(bench):
    model, chat, lens = bench.engine.model, bench.chat, bench.lens
    chat.reset()
    chat.max_tokens.value = 6
    chat.input.value = "Tell me a fact about cats."
    chat.send().result(120)
    lenses = lens.last_future.result(60)  # read on its own once the turn's plots are drawn
    handles = dict(zip(lens.captures.labels, lens.captures.handles))
    assert lens.token.value == -1 and lens.token.label.startswith("prompt -1")
    for label in (BASELINE, STEERED):
        assert len(lenses[label]) == model.layer_count and all(len(row) == 5 for row in lenses[label])
        # At the last prompt token the last layer's top token is the branch's own (greedy) first reply token.
        assert lenses[label][-1][0][0] == handles[label].generated_token_ids[0]
    steered = handles[STEERED]
    direct = bench.engine.run(model.logit_lens(steered.hidden(10)[len(steered.prompt_token_ids) - 1], top_k=5))
    assert lenses[STEERED][10] == direct[0]

    def top_ids(rows):
        return [[token for token, _, _ in row] for row in rows]

    # Steering adds at layer 3: the layers before it read the same tokens, the later ones do not.
    assert top_ids(lenses[BASELINE][:3]) == top_ids(lenses[STEERED][:3])
    assert top_ids(lenses[BASELINE][3:]) != top_ids(lenses[STEERED][3:])
    assert lens.table.value.count("<tr>") == model.layer_count + 1 and "next was" in lens.table.value

    # A heatmap click picks its token; a position before this turn is refused with a message.
    lens.select(STEERED, len(steered.prompt_token_ids) + 1)
    lens.last_future.result(60)
    assert lens.token.value == 1 and "reply 1" in lens.status.value
    lens.select(STEERED, 0)
    assert lens.token.value == 1 and "before this turn" in lens.status.value
    lens.top_k.value = 3
    assert all(len(row) == 3 for row in lens.last_future.result(60)[STEERED])
    chat.reset()


@pytest.mark.slow
def test_stop_aborts_a_long_turn_and_the_next_send_works(bench):
    chat = bench.chat
    chat.max_tokens.value = 512
    chat.input.value = "Write a long story about a dragon who learns to bake bread."
    chat.send()
    wait_for(lambda: len(chat.conversation.turns[-1].replies[STEERED]) > 20, 60)
    began = time.monotonic()
    chat.stop()
    wait_for(lambda: not chat.busy, 2.0)
    assert time.monotonic() - began < 2.0
    assert chat.conversation.turns[-1].state == STOPPED and "stopped" in chat.status.value
    assert not chat.history(STEERED)
    assert not bench.engine.model.engine.output_processor.get_num_unfinished_requests()
    chat.max_tokens.value = 8
    chat.input.value = "Name a colour."
    chat.send().result(120)
    assert len(chat.history(STEERED)) == 2 and chat.conversation.turns[-1].state == "done"


@pytest.mark.slow
def test_session_round_trip_and_background_export(bench, tmp_path):
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
    assert "mine-2-add" in bench.steering.spec_text.value

    folder = tmp_path / "session"
    bench.save_session(folder)
    settings = bench.chat.settings()

    def heatmap_data() -> dict:
        return go.Figure(bench.activations.message_cosines).to_dict()["data"][0]["z"]

    heatmap = heatmap_data()
    bench.chat.reset()
    bench.steering.clear().result(60)
    bench.load_session(folder).result(60)
    assert bench.chat.settings() == settings
    assert "Name a colour." in bench.chat.columns[STEERED].value
    assert_spec_close(model.export_steering_spec(), spec)
    assert heatmap_data() == heatmap

    progress = []
    bench.export_progress.observe(lambda change: progress.append(change["new"]), names="value")
    future = bench.export_figures_in_background(tmp_path / "figures")
    assert isinstance(future, concurrent.futures.Future) and bench.export_button.disabled
    assert bench.export_figures_in_background(tmp_path / "again") is None  # one export at a time
    paths = future.result(300)
    assert len(paths) == 3 * len(bench.figures()) == 3 * 6
    assert progress[-1] == 6 and not bench.export_button.disabled
    for path in paths:
        content = path.read_bytes()
        expected = {".png": b"\x89PNG", ".svg": b"<svg", ".html": b"plotly"}[path.suffix]
        assert expected in content[:200] if path.suffix == ".png" else expected in content, path


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
            assert got.projection_cap.min == pytest.approx(want.projection_cap.min)
        if want.ablation is not None:
            assert got.ablation.scale == pytest.approx(want.ablation.scale)


@pytest.mark.slow
def test_sweep_starts_from_no_steering_and_direction_from_captures(bench):
    sweep, model = bench.sweep, bench.engine.model
    assert not model.export_steering_spec().is_empty()  # the editor steers; the sweep ignores it by default
    sweep.layer.value, sweep.scales.value, sweep.max_tokens.value = 3, "0, 8, 32", 6
    bench.chat.system.value = ""
    bench.chat.reset()
    assert "plain text" in sweep.context_label.value
    sweep.run().result(120)
    assert list(sweep.frame["scale"]) == [0.0, 8.0, 32.0] and sweep.progress.value == 3
    baseline = bench.engine.run(
        model.generate(sweep.prompt.value, steering_spec=SteeringSpec(), temperature=0.0, max_tokens=6)
    )
    assert sweep.frame.loc[0, "text"] == str(baseline[0])
    assert list(sweep.figure.data[0].x) == [0.0, 8.0, 32.0] and "layer 3" in sweep.figure.layout.title.text
    assert "<table" in sweep.table.value and "projection (generated mean)" in sweep.table.value
    projections = list(sweep.frame["proj_generated_mean"])
    assert projections[2] > projections[0]  # adding more of the direction moves the stream along it

    sweep.stack.value = True
    sweep.run().result(120)
    assert sweep.frame.loc[0, "text"] != str(baseline[0]) and "from the editor" in sweep.status.value
    sweep.stack.value = False
    bench.chat.system.value = "You are a helpful assistant."
    assert "chat turn" in sweep.context_label.value
    sweep.unit.value, sweep.scales.value, sweep.max_tokens.value = "typical", "0, 0.5", 1
    sweep.run().result(120)
    assert sweep.frame["relative"].tolist() == pytest.approx([0.0, 0.5])
    assert "nan" not in sweep.table.value.lower() and "no projection" in sweep.table.value
    sweep.scales.value = "a, b"
    assert sweep.run() is None and "scales must be numbers" in sweep.status.value
    sweep.unit.value, sweep.max_tokens.value = "absolute", 6

    contrast = bench.contrast
    contrast.positive.value = "I love this!\nWhat a wonderful day."
    contrast.negative.value = "I hate this.\nWhat an awful day."
    contrast.layer.value, contrast.name.value = 5, "sentiment"
    contrast.make().result(120)
    vector, metadata = bench.library.load("sentiment")
    assert vector.shape == (576,) and metadata["method"] == "mean_diff" and metadata["layer"] == 5
    # The new vector is offered at once, with its norm shown.
    assert "sentiment" in dict(bench.steering.rows[0].vector.options).values()
    bench.steering.rows[0].vector.value = "sentiment"
    assert "‖v‖ =" in bench.steering.rows[0].norm.value
    sweep.vector.value, sweep.scales.value = "sentiment", "0, 4"
    sweep.run().result(120)
    assert len(sweep.frame) == 2
    assert isinstance(sweep.frame, pd.DataFrame)
