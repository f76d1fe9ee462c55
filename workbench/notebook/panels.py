"""Widget panels: steering editor, chat (with baseline/steered compare) and
live activation plots, composed by ``Workbench``.

Panels hold widgets and talk to the engine only through the bridge
(``NotebookEngine.submit``), so no callback blocks the kernel while the model
generates. The state -> spec logic is a plain function (``rows_to_spec``) and
the plots are ``figures`` builders, both testable without widgets. Errors
raised in callbacks are shown in the panel's status line.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
import torch

from workbench.errors import SpecError
from workbench.notebook import figures
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.session import FIGURE_FORMATS, Session, export_figure, load_session, save_session
from workbench.ops import OP_NAMES
from workbench.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from workbench.tables import captures_frame
from workbench.vector_library import VectorLibrary

OP_LABELS = dict(zip(OP_NAMES, ("add", "cap", "ablate")))
"""Short labels the editor shows for each op."""


@dataclass
class RowState:
    """One steering row of the editor, as plain values."""

    layer: int
    op: str = "add"
    """One of ``ops.OP_NAMES``."""
    source: str = "random"
    """"random" (seeded) or the name of a vector in the library folder."""
    seed: int = 0
    vector_name: str = ""
    scale: float = 4.0
    cap_range: tuple[float, float] = (-5.0, 5.0)
    positions: str = "all"
    """Tokens the op applies to: "all", "prompt" or "generated"."""
    enabled: bool = True


def _direction(row: RowState, hidden_size: int, library: VectorLibrary | None) -> torch.Tensor:
    if row.source == "random":
        vector = torch.randn(hidden_size, generator=torch.Generator().manual_seed(row.seed))
        return vector / vector.norm()
    if library is None:
        raise SpecError(f"row for layer {row.layer} names vector {row.vector_name!r} but no library folder is set")
    vector, _ = library.load(row.vector_name)
    return vector


def rows_to_spec(rows: list[RowState], hidden_size: int, library: VectorLibrary | None = None) -> SteeringSpec:
    """The spec the editor's rows describe (disabled rows are skipped; two
    enabled rows with the same layer and op are an error, not merged)."""
    layers: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not row.enabled:
            continue
        if row.op not in OP_NAMES:
            raise SpecError(f"unknown op {row.op!r}; known: {list(OP_NAMES)}")
        ops = layers.setdefault(row.layer, {})
        if row.op in ops:
            raise SpecError(
                f"two rows set {OP_LABELS[row.op]!r} on layer {row.layer}; one layer takes each op once "
                "(remove or disable one of them)"
            )
        vector = _direction(row, hidden_size, library)
        if row.op == "add":
            ops["add"] = AddSpec(vector, scale=row.scale, positions=row.positions)
        elif row.op == "projection_cap":
            low, high = row.cap_range
            ops["projection_cap"] = ProjectionCapSpec(vector, min=low, max=high, positions=row.positions)
        else:
            ops["ablation"] = AblationSpec(vector, scale=row.scale, positions=row.positions)
    return SteeringSpec({layer: LayerSteeringSpec(**ops) for layer, ops in layers.items()})


OPEN_BOUND = 1e9
"""Stands for a missing cap bound in the editor (a range slider needs two numbers)."""


def rows_from_spec(spec: SteeringSpec, library: VectorLibrary, prefix: str) -> list[RowState]:
    """Editor rows that rebuild ``spec``: each vector goes into ``library`` as
    ``<prefix>-<layer>-<op>`` (add vectors as a unit direction plus the scale)."""
    rows = []
    for layer, layer_spec in sorted(spec.layers.items()):
        if (add := layer_spec.add) is not None:
            norm = float(add.effect.norm())
            library.save(name := f"{prefix}-{layer}-add", add.effect / norm)
            rows.append(RowState(layer, "add", "library", vector_name=name, scale=norm, positions=add.positions))
        if (cap := layer_spec.projection_cap) is not None:
            library.save(name := f"{prefix}-{layer}-cap", cap.vector)
            bounds = (-OPEN_BOUND if cap.min is None else cap.min, OPEN_BOUND if cap.max is None else cap.max)
            rows.append(
                RowState(
                    layer, "projection_cap", "library", vector_name=name, cap_range=bounds, positions=cap.positions
                )
            )
        if (ablation := layer_spec.ablation) is not None:
            library.save(name := f"{prefix}-{layer}-ablate", ablation.vector)
            scale, positions = ablation.scale, ablation.positions
            rows.append(RowState(layer, "ablation", "library", vector_name=name, scale=scale, positions=positions))
    return rows


def _error_html(error: BaseException) -> str:
    return f"<span style='color:#b00020'>{html.escape(type(error).__name__)}: {html.escape(str(error))}</span>"


class _StatusMixin:
    status: w.HTML

    def _report(self, error: BaseException | None, ok: str = "") -> None:
        self.status.value = _error_html(error) if error is not None else html.escape(ok)


class SteeringRow:
    """Widgets of one ``RowState``."""

    def __init__(self, state: RowState, layer_count: int, on_remove: Any) -> None:
        self.layer = w.BoundedIntText(
            value=state.layer, min=0, max=layer_count - 1, description="layer", layout={"width": "150px"}
        )
        self.op = w.Dropdown(
            options=[(label, name) for name, label in OP_LABELS.items()], value=state.op, layout={"width": "90px"}
        )
        self.source = w.Dropdown(
            options=["random", "library"],
            value="random" if state.source == "random" else "library",
            layout={"width": "100px"},
        )
        self.seed = w.IntText(value=state.seed, description="seed", layout={"width": "130px"})
        self.vector_name = w.Text(value=state.vector_name, placeholder="vector name", layout={"width": "140px"})
        self.scale = w.FloatSlider(
            value=state.scale, min=-200.0, max=200.0, step=1.0, description="scale", continuous_update=False
        )
        self.cap_range = w.FloatRangeSlider(
            value=state.cap_range,
            min=min(-50.0, state.cap_range[0]),
            max=max(50.0, state.cap_range[1]),
            step=0.5,
            description="cap",
            continuous_update=False,
        )
        self.positions = w.Dropdown(
            options=["all", "prompt", "generated"], value=state.positions, layout={"width": "110px"}
        )
        self.enabled = w.Checkbox(value=state.enabled, description="on", indent=False, layout={"width": "50px"})
        remove = w.Button(icon="trash", tooltip="remove row", layout={"width": "36px"})
        remove.on_click(lambda _: on_remove(self))
        # Two lines, so a row fits the editor's half of the workbench.
        self.box = w.VBox(
            [
                w.HBox([self.enabled, self.layer, self.op, self.positions, remove]),
                w.HBox([self.source, self.seed, self.vector_name, self.scale, self.cap_range]),
            ],
            layout={"border_bottom": "1px solid #ddd"},
        )
        self.op.observe(self._show_relevant, names="value")
        self.source.observe(self._show_relevant, names="value")
        self._show_relevant()

    def _show_relevant(self, _: Any = None) -> None:
        self.cap_range.layout.display = "" if self.op.value == "projection_cap" else "none"
        self.scale.layout.display = "none" if self.op.value == "projection_cap" else ""
        self.scale.description = "keep" if self.op.value == "ablation" else "scale"
        self.seed.layout.display = "" if self.source.value == "random" else "none"
        self.vector_name.layout.display = "none" if self.source.value == "random" else ""

    def state(self) -> RowState:
        return RowState(
            layer=self.layer.value,
            op=self.op.value,
            source="random" if self.source.value == "random" else "library",
            seed=self.seed.value,
            vector_name=self.vector_name.value,
            scale=self.scale.value,
            cap_range=tuple(self.cap_range.value),
            positions=self.positions.value,
            enabled=self.enabled.value,
        )


class SteeringPanel(_StatusMixin):
    """Edit steering row by row; Apply swaps the model's spec atomically."""

    def __init__(self, engine: NotebookEngine, library_dir: str | Path = "vectors") -> None:
        self.engine = engine
        self.library = VectorLibrary(library_dir)
        self.rows: list[SteeringRow] = []
        self.rows_box = w.VBox()
        self.spec_text = w.HTML("<code>SteeringSpec(empty)</code>")
        self.status = w.HTML()
        self.path = w.Text(value="steering.safetensors", description="file")
        add_row = w.Button(description="Add row", icon="plus")
        apply = w.Button(description="Apply", button_style="primary", icon="check")
        clear = w.Button(description="Clear", icon="eraser")
        save = w.Button(description="Save", icon="save")
        load = w.Button(description="Load", icon="folder-open")
        add_row.on_click(lambda _: self.add_row(RowState(layer=min(4, engine.model.layer_count - 1))))
        apply.on_click(lambda _: self.apply())
        clear.on_click(lambda _: self.clear())
        save.on_click(lambda _: self.save())
        load.on_click(lambda _: self.load())
        self.apply_button = apply
        self.last_future: Any = None
        self.widget = w.VBox(
            [
                w.HTML("<b>Steering</b>"),
                self.rows_box,
                w.HBox([add_row, apply, clear]),
                w.HBox([self.path, save, load]),
                self.spec_text,
                self.status,
            ]
        )

    def add_row(self, state: RowState) -> SteeringRow:
        row = SteeringRow(state, self.engine.model.layer_count, self._remove)
        self.rows.append(row)
        self.rows_box.children = [r.box for r in self.rows]
        return row

    def _remove(self, row: SteeringRow) -> None:
        self.rows.remove(row)
        self.rows_box.children = [r.box for r in self.rows]

    def current_spec(self) -> SteeringSpec:
        return rows_to_spec([row.state() for row in self.rows], self.engine.model.hidden_size, self.library)

    def apply(self) -> Any:
        """Build the spec from the rows and apply it (atomically) on the engine."""
        try:
            spec = self.current_spec()
        except Exception as error:  # shown to the user, not lost
            self._report(error)
            return None
        self.spec_text.value = f"<code>{html.escape(repr(spec))}</code>"
        self.last_future = self.engine.submit(
            self.engine.model.apply_steering_spec(spec), lambda _, error: self._report(error, "applied")
        )
        return self.last_future

    def clear(self) -> Any:
        self.rows = []
        self.rows_box.children = []
        return self.apply()

    def save(self) -> None:
        try:
            self.current_spec().save(self.path.value)
            self._report(None, f"saved to {self.path.value}")
        except Exception as error:
            self._report(error)

    def load(self) -> Any:
        """Load a spec file into editor rows (its vectors go into the library) and apply it."""
        try:
            spec = SteeringSpec.load(self.path.value)
            spec.validate_for(self.engine.model.hidden_size, self.engine.model.layer_count)
        except Exception as error:
            self._report(error)
            return None
        return self.show_spec(spec, Path(self.path.value).stem)

    def show_spec(self, spec: SteeringSpec, name: str) -> Any:
        """Replace the rows by ones that rebuild ``spec`` and apply it."""
        self.rows = []
        for state in rows_from_spec(spec, self.library, name):
            self.add_row(state)
        self.rows_box.children = [r.box for r in self.rows]
        return self.apply()


@dataclass
class Turn:
    user: str
    replies: dict[str, str] = field(default_factory=dict)
    """Label ("steered", "baseline") -> reply text."""


class ActivationsPanel:
    """Live plots of the latest turn's captures."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.layer_norms = go.FigureWidget(figures.build_layer_norm_figure(_empty_frame()))
        self.message_norms = go.FigureWidget(figures.build_message_norm_figure(_empty_frame(), layer))
        self.layer_cosines = go.FigureWidget(figures.build_layer_cosine_figure(_empty_cosines()))
        self.heatmap = go.FigureWidget(figures.build_token_heatmap_figure(_empty_frame()))
        self.message_cosines = go.FigureWidget(figures.build_cosine_heatmap_figure(_empty_message_cosines()))
        self.frame = _empty_frame()
        self.widget = w.VBox(
            [
                w.HBox([self.layer_norms, self.message_norms]),
                w.HBox([self.layer_cosines, self.message_cosines]),
                self.heatmap,
            ]
        )

    def update(self, handles: list[Any], labels: list[str], tokenizer: Any) -> None:
        self.frame = captures_frame(handles, tokenizer, labels=labels)
        cosines = figures.layer_cosines(handles[0], handles[1]) if len(handles) > 1 else _empty_cosines()
        _replace(self.layer_norms, figures.build_layer_norm_figure(self.frame))
        _replace(self.message_norms, figures.build_message_norm_figure(self.frame, self.layer))
        _replace(self.layer_cosines, figures.build_layer_cosine_figure(cosines))
        _replace(self.heatmap, figures.build_token_heatmap_figure(self.frame, labels[-1]))
        _replace(
            self.message_cosines, figures.build_cosine_heatmap_figure(figures.message_cosines(handles[-1], self.layer))
        )

    def figures(self) -> dict[str, go.FigureWidget]:
        return {
            "layer_norms": self.layer_norms,
            "message_norms": self.message_norms,
            "layer_cosines": self.layer_cosines,
            "token_heatmap": self.heatmap,
            "message_cosines": self.message_cosines,
        }


def _empty_frame() -> Any:
    import pandas as pd

    return pd.DataFrame(
        columns=["request", "layer", "position", "token_id", "token", "phase", "message", "role", "norm"]
    ).astype({"layer": int, "position": int, "message": int, "norm": float})


def _empty_message_cosines() -> Any:
    import pandas as pd

    return pd.DataFrame({"message_a": [], "message_b": [], "cosine": []})


def _empty_cosines() -> Any:
    import pandas as pd

    return pd.DataFrame({"layer": [], "cosine": []})


def _replace(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Swap a FigureWidget's traces and title for a freshly built figure's, in one message."""
    with widget.batch_update():
        widget.data = []
        for trace in figure.data:
            widget.add_trace(trace)
        widget.layout.title = figure.layout.title


class ChatPanel(_StatusMixin):
    """Chat with the steered model; "compare" also generates the unsteered reply in the same batch."""

    def __init__(self, engine: NotebookEngine, activations: ActivationsPanel) -> None:
        self.engine = engine
        self.activations = activations
        self.history: list[dict[str, str]] = []
        self.turns: list[Turn] = []
        self.transcript = w.HTML()
        self.system = w.Textarea(value="You are a helpful assistant.", description="system", layout={"width": "95%"})
        self.prefill = w.Text(
            placeholder="assistant prefill (optional)", description="prefill", layout={"width": "95%"}
        )
        self.input = w.Text(placeholder="Say something", description="you", layout={"width": "70%"})
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.compare = w.Checkbox(value=True, description="compare with baseline")
        self.temperature = w.FloatSlider(
            value=0.0, min=0.0, max=1.5, step=0.05, description="temperature", continuous_update=False
        )
        self.max_tokens = w.IntSlider(value=48, min=1, max=512, description="max tokens", continuous_update=False)
        self.status = w.HTML()
        self.last_future: Any = None
        self.send_button.on_click(lambda _: self.send())
        self.input.on_submit(lambda _: self.send())
        reset = w.Button(description="New chat", icon="refresh")
        reset.on_click(lambda _: self.reset())
        self.widget = w.VBox(
            [
                w.HTML("<b>Chat</b>"),
                self.system,
                self.transcript,
                w.HBox([self.input, self.send_button, reset]),
                self.prefill,
                w.HBox([self.compare, self.temperature, self.max_tokens]),
                self.status,
            ]
        )

    def reset(self) -> None:
        self.history, self.turns = [], []
        self._render()

    def settings(self) -> dict[str, Any]:
        """The controls' values and the turns shown (baseline replies included), as JSON-able data."""
        return {
            "system": self.system.value,
            "prefill": self.prefill.value,
            "compare": self.compare.value,
            "temperature": self.temperature.value,
            "max_tokens": self.max_tokens.value,
            "turns": [{"user": turn.user, "replies": turn.replies} for turn in self.turns],
        }

    def restore(self, history: list[dict[str, str]], settings: dict[str, Any]) -> None:
        """Put back a saved conversation and the controls' values."""
        for name in ("system", "prefill", "compare", "temperature", "max_tokens"):
            if name in settings:
                getattr(self, name).value = settings[name]
        self.history = list(history)
        self.turns = [Turn(turn["user"], dict(turn["replies"])) for turn in settings.get("turns", [])]
        self._render()

    def _render(self) -> None:
        parts = []
        for turn in self.turns:
            parts.append(f"<p><b>you:</b> {html.escape(turn.user)}</p>")
            for label, reply in turn.replies.items():
                parts.append(f"<p><b>{html.escape(label)}:</b> {html.escape(reply)}</p>")
        self.transcript.value = "".join(parts)

    def send(self) -> Any:
        """Send the input box's text; returns the bridge future (widgets update when it finishes)."""
        text = self.input.value.strip()
        if not text:
            return None
        from vllm import SamplingParams

        messages = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        messages += [*self.history, {"role": "user", "content": text}]
        options = None
        if self.prefill.value:
            messages.append({"role": "assistant", "content": self.prefill.value})
            options = {"add_generation_prompt": False, "continue_final_message": True}
        model = self.engine.model
        current = model.export_steering_spec()
        labels = ["baseline", "steered"] if self.compare.value else ["steered"]
        specs = [SteeringSpec(), current] if self.compare.value else [current]
        params = SamplingParams(temperature=self.temperature.value, max_tokens=self.max_tokens.value)
        self.input.value = ""
        self.status.value = "generating..."

        async def turn() -> tuple[list[Any], list[Any]]:
            responses, handles = await model.chat(
                [messages] * len(specs),
                sampling_params=params,
                chat_options=options,
                capture_layers=list(range(model.layer_count)),
                steering_spec=specs,
            )
            await model.fetch_captures_batch(handles)
            return responses, handles

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self._report(error)
                return
            responses, handles = result
            self.turns.append(Turn(text, {label: r.full_text() for label, r in zip(labels, responses)}))
            self.history += [{"role": "user", "content": text}, responses[-1].to_message()]
            self._render()
            self.activations.update(handles, labels, model.tokenizer)
            self._report(None, "")

        self.last_future = self.engine.submit(turn(), done)
        return self.last_future


def _layer_input(layer_count: int) -> w.BoundedIntText:
    return w.BoundedIntText(value=layer_count // 2, min=0, max=layer_count - 1, description="layer")


def parse_scales(text: str) -> list[float]:
    """Scales typed as "0, 2, 4" or "0 2 4"."""
    try:
        scales = [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise SpecError(f"scales must be numbers separated by commas or spaces, got {text!r}") from None
    if not scales:
        raise SpecError("scales is empty")
    return scales


class SweepPanel(_StatusMixin):
    """One layer and direction at many scales, run as one batch; texts as a
    table and the projection on the direction against scale."""

    def __init__(self, engine: NotebookEngine, library: VectorLibrary) -> None:
        self.engine = engine
        self.library = library
        model = engine.model
        self.layer = _layer_input(model.layer_count)
        self.op = w.Dropdown(options=["add", "ablation"], value="add", description="op")
        self.seed = w.IntText(value=0, description="seed")
        self.vector_name = w.Text(placeholder="library vector (else random from seed)", description="vector")
        self.scales = w.Text(value="0, 4, 8, 16, 32", description="scales")
        self.prompt = w.Text(value="Tell me about your day.", description="prompt", layout={"width": "95%"})
        self.max_tokens = w.IntSlider(value=24, min=1, max=256, description="max tokens", continuous_update=False)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="sweep")
        self.table = w.HTML()
        self.figure = go.FigureWidget(figures.build_sweep_figure(_empty_sweep()))
        self.status = w.HTML()
        self.frame = _empty_sweep()
        self.last_future: Any = None
        run = w.Button(description="Run sweep", button_style="primary", icon="play")
        run.on_click(lambda _: self.run())
        self.widget = w.VBox(
            [
                w.HTML("<b>Sweep</b>"),
                w.HBox([self.layer, self.op, self.seed, self.vector_name]),
                w.HBox([self.scales, self.max_tokens, run, self.progress]),
                self.prompt,
                w.HBox([self.figure, self.table]),
                self.status,
            ]
        )

    def run(self) -> Any:
        """Start the sweep; returns the bridge future (the table and plot update when it finishes)."""
        from vllm import SamplingParams

        model = self.engine.model
        try:
            scales = parse_scales(self.scales.value)
            source = "library" if self.vector_name.value.strip() else "random"
            row = RowState(self.layer.value, source=source, seed=self.seed.value, vector_name=self.vector_name.value)
            vector = _direction(row, model.hidden_size, self.library)
        except Exception as error:
            self._report(error)
            return None
        self.progress.value, self.progress.max = 0, len(scales)
        self.status.value = "running..."

        def progress(done: int, total: int) -> None:
            self.progress.value = done

        def done(frame: Any, error: BaseException | None) -> None:
            if error is not None:
                self._report(error)
                return
            self.frame = frame
            self.table.value = frame[["scale", "proj_generated_mean", "text"]].to_html(index=False, float_format="%.2f")
            _replace(self.figure, figures.build_sweep_figure(frame))
            self._report(None, f"{len(frame)} scales")

        sweep = model.sweep(
            self.prompt.value,
            self.layer.value,
            vector,
            scales,
            SamplingParams(temperature=0.0, max_tokens=self.max_tokens.value),
            op=self.op.value,
            progress=progress,
        )
        self.last_future = self.engine.submit(sweep, done)
        return self.last_future


def _empty_sweep() -> Any:
    import pandas as pd

    return pd.DataFrame({"scale": [], "proj_generated_mean": [], "text": pd.Series([], dtype=object)})


class ContrastPanel(_StatusMixin):
    """A direction from the difference of captured means of two prompt sets,
    saved into the vector library so steering and sweep rows can use it."""

    def __init__(self, engine: NotebookEngine, library: VectorLibrary) -> None:
        self.engine = engine
        self.library = library
        model = engine.model
        self.positive = w.Textarea(placeholder="one example per line", description="positive")
        self.negative = w.Textarea(placeholder="one example per line", description="negative")
        self.layer = _layer_input(model.layer_count)
        self.tokens = w.Dropdown(options=["last_prompt", "prompt_mean"], value="last_prompt", description="tokens")
        self.name = w.Text(value="contrast", description="save as")
        self.status = w.HTML()
        self.last_future: Any = None
        make = w.Button(description="Make vector", icon="magic")
        make.on_click(lambda _: self.make())
        self.widget = w.VBox(
            [
                w.HTML("<b>Direction from captured means</b> (positive minus negative)"),
                w.HBox([self.positive, self.negative]),
                w.HBox([self.layer, self.tokens, self.name, make]),
                self.status,
            ]
        )

    def make(self) -> Any:
        from workbench.contrast import extract_contrast_vectors

        positive = [line for line in self.positive.value.splitlines() if line.strip()]
        negative = [line for line in self.negative.value.splitlines() if line.strip()]
        layer, name = self.layer.value, self.name.value

        async def extract() -> Any:
            vectors = await extract_contrast_vectors(
                self.engine.model, positive, negative, [layer], tokens=self.tokens.value
            )
            return self.library.save(name, vectors[layer])

        def done(_: Any, error: BaseException | None) -> None:
            self._report(error, f"saved {name!r} (layer {layer}); use it as a library vector")

        self.last_future = self.engine.submit(extract(), done)
        return self.last_future


class Workbench(_StatusMixin):
    """Steering editor, chat and activation plots for one engine, and a
    session bar that saves / reloads the session and exports the figures.

    Example::

        from workbench.notebook import get_engine, Workbench
        bench = Workbench(get_engine())
        bench  # displays the panels
    """

    def __init__(
        self, engine: NotebookEngine, plot_layer: int | None = None, library_dir: str | Path = "vectors"
    ) -> None:
        layer = plot_layer if plot_layer is not None else engine.model.layer_count // 2
        self.engine = engine
        self.steering = SteeringPanel(engine, library_dir)
        self.activations = ActivationsPanel(layer)
        self.chat = ChatPanel(engine, self.activations)
        self.chat.widget.layout.width = "55%"
        self.steering.widget.layout.width = "45%"
        self.sweep = SweepPanel(engine, self.steering.library)
        self.contrast = ContrastPanel(engine, self.steering.library)
        self.folder = w.Text(value="session", description="folder")
        self.status = w.HTML()
        buttons = {
            "Save session": lambda _: self._safely(self.save_session, self.folder.value),
            "Load session": lambda _: self._safely(self.load_session, self.folder.value),
            "Export figures": lambda _: self._safely(self.export_figures, self.folder.value),
        }
        bar = [self.folder]
        for label, callback in buttons.items():
            button = w.Button(description=label)
            button.on_click(callback)
            bar.append(button)
        self.widget = w.VBox(
            [
                w.HBox([self.chat.widget, self.steering.widget], layout={"width": "100%"}),
                w.HBox([*bar, self.status]),
                self.activations.widget,
                w.Accordion([self.sweep.widget, self.contrast.widget], titles=("Sweep", "Direction from captures")),
            ]
        )

    def _safely(self, action: Any, folder: str) -> None:
        try:
            action(folder)
            self._report(None, f"{action.__name__.replace('_', ' ')}: {folder}")
        except Exception as error:
            self._report(error)

    def figures(self) -> dict[str, go.FigureWidget]:
        """Every plot of the workbench by name."""
        return {**self.activations.figures(), "sweep": self.sweep.figure}

    def session(self) -> Session:
        return Session(
            spec=self.engine.model.export_steering_spec(),
            history=list(self.chat.history),
            settings=self.chat.settings(),
            figures=dict(self.figures()),
        )

    def save_session(self, folder: str | Path, figure_formats: tuple[str, ...] = ()) -> Path:
        """Spec, conversation, controls and figure data into ``folder`` (reload with ``load_session``)."""
        return save_session(folder, self.session(), figure_formats)

    def load_session(self, folder: str | Path) -> Any:
        """Restore a saved session: editor rows and the applied spec, chat, controls, figures."""
        saved = load_session(folder)
        self.chat.restore(saved.history, saved.settings)
        for name, widget in self.figures().items():
            if name in saved.figures:
                _replace(widget, saved.figures[name])
        return self.steering.show_spec(saved.spec, f"{Path(folder).name}-spec")

    def export_figures(self, folder: str | Path, formats: tuple[str, ...] = FIGURE_FORMATS) -> list[Path]:
        """Every plot as standalone HTML, PNG and SVG under ``folder``."""
        return [
            path
            for name, figure in self.figures().items()
            for path in export_figure(figure, Path(folder) / name, formats)
        ]

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
