"""The sweep panel: one layer and direction at many scales, run as one batch.

A sweep starts from a stated base: no steering unless "stack on the
editor's current steering" is checked. It runs as a chat turn when the chat
has a system prompt or history (the steered branch's), as plain text
otherwise, and the panel says which. A reply that is empty (the first token
generated ended it, so no generated token went through the model) is
explained, not shown as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ipywidgets as w
import pandas as pd

from workbench.errors import SpecError
from workbench.notebook import figures
from workbench.notebook.editor import RANDOM, RowState, direction
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.plot_widget import PlotWidget
from workbench.notebook.residual_norms import TypicalNorms
from workbench.notebook.widgets import StatusLine, replace_figure
from workbench.specs import SteeringSpec
from workbench.vector_library import VectorLibrary

Context = Callable[[], tuple[str, list[dict[str, str]]]]
"""The chat's system prompt and the steered branch's history."""


def parse_scales(text: str) -> list[float]:
    """Scales typed as "0, 2, 4" or "0 2 4" (finite numbers)."""
    try:
        scales = [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise SpecError(f"scales must be numbers separated by commas or spaces, got {text!r}") from None
    if not scales:
        raise SpecError("scales is empty")
    if bad := [s for s in scales if not math.isfinite(s)]:
        raise SpecError(f"scales must be finite numbers, got {bad[0]}")
    return scales


def sweep_prompt(system: str, history: list[dict[str, str]], prompt: str) -> tuple[Any, str]:
    """What the sweep sends, and a sentence saying so: a chat turn after the
    system prompt and history when there are any, else the plain text."""
    if not system.strip() and not history:
        return prompt, "runs as plain text (no chat template): the chat has no system prompt and no history"
    head = [{"role": "system", "content": system}] if system.strip() else []
    turns = len(history) // 2
    parts = (["the chat's system prompt"] if head else []) + (
        [f"{turns} earlier turns (steered branch)"] if turns else []
    )
    return [*head, *history, {"role": "user", "content": prompt}], "runs as a chat turn after " + " and ".join(parts)


def explain_row(text: str, generated_tokens: int, nonfinite_layer: Any) -> str:
    """Why a sweep row's reply or projection is missing or not to be trusted ("" when all is there)."""
    if nonfinite_layer is not None and not pd.isna(nonfinite_layer):
        return f"steering broke the residual stream at layer {int(nonfinite_layer)}: the text is not the model's"
    if generated_tokens <= 1:
        what = "empty reply: the first token generated ended it" if not text else "one token generated"
        return f"{what}, so no generated token went through the model and there is no projection"
    if not text:
        return "empty reply: only special tokens were generated"
    return ""


def explain_rows(frame: pd.DataFrame) -> pd.Series:
    """``explain_row`` for every row of a sweep."""
    layers = frame["nonfinite_layer"] if "nonfinite_layer" in frame else [None] * len(frame)
    notes = [explain_row(*row) for row in zip(frame["text"], frame["generated_tokens"], layers)]
    return pd.Series(notes, index=frame.index, dtype=object)


def sweep_table(frame: pd.DataFrame) -> str:
    """The sweep as an HTML table in words (replies escaped, empty ones explained)."""
    shown = pd.DataFrame(
        {
            "scale": frame["scale"].map("{:.4g}".format),
            "× typical": frame["relative"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}"),
            "projection (generated mean)": frame["proj_generated_mean"].map(
                lambda v: "—" if pd.isna(v) else f"{v:.2f}"
            ),
            "reply": [
                f"{text} ({note})" if text and note else note or text
                for text, note in zip(frame["text"], frame["note"])
            ],
        }
    )
    return shown.to_html(index=False, escape=True, classes="wb-sweep", border=0)


class SweepPanel:
    """One layer and direction at many scales; texts as a table, projection against scale."""

    def __init__(self, engine: NotebookEngine, library: VectorLibrary, context: Context) -> None:
        self.engine = engine
        self.library = library
        self.context = context
        self.typical: TypicalNorms | None = None
        model = engine.model
        self.layer = w.Dropdown(options=list(range(model.layer_count)), value=model.layer_count // 2)
        self.op = w.Dropdown(options=[("add", "add"), ("ablate", "ablation")], value="add")
        self.vector = w.Dropdown(layout={"width": "190px"})
        self.seed = w.IntText(value=0, description="seed", layout={"width": "120px"})
        self.scales = w.Text(value="0, 4, 8, 16, 32", layout={"flex": "1 1 120px", "width": "auto"})
        self.unit = w.ToggleButtons(
            options=[("absolute", "absolute"), ("× typical norm", "typical")],
            value="absolute",
            style={"button_width": "auto"},
        )
        self.stack = w.Checkbox(value=False, description="stack on the editor's current steering", indent=False)
        self.prompt = w.Text(value="Tell me about your day.", layout={"width": "98%"})
        self.max_tokens = w.IntSlider(value=24, min=1, max=256, description="max tokens", continuous_update=False)
        self.max_tokens.style.description_width = "initial"
        self.progress = w.IntProgress(value=0, min=0, max=1, layout={"width": "160px"})
        self.context_label = w.HTML()
        self.table = w.HTML(layout={"overflow": "auto", "max_height": "420px", "width": "100%"})
        self.figure = PlotWidget(figures.build_sweep_figure(_empty_sweep()))
        self.status = StatusLine()
        self.frame = _empty_sweep()
        self.last_future: Any = None
        run = w.Button(description="Run sweep", button_style="primary", icon="play")
        run.on_click(lambda _: self.run())
        self.vector.observe(lambda _: self._show_relevant(), names="value")
        self.op.observe(lambda _: self._show_relevant(), names="value")
        self.refresh_library()

        def labelled(text: str, widget: w.Widget) -> w.HBox:
            return w.HBox([w.Label(text), widget], layout={"align_items": "center"})

        row = {"flex_flow": "row wrap", "align_items": "center", "grid_gap": "8px", "width": "100%"}
        self.widget = w.VBox(
            [
                w.HBox([labelled("layer", self.layer), labelled("op", self.op), self.vector, self.seed], layout=row),
                w.HBox([labelled("scales", self.scales), self.unit], layout=row),
                w.HBox([labelled("prompt", self.prompt)], layout={"width": "100%"}),
                self.context_label,
                w.HBox([self.stack, self.max_tokens, run, self.progress], layout=row),
                w.GridBox(
                    [w.Box([self.figure], layout={"min_width": "0"}), self.table],
                    layout={"grid_template_columns": "repeat(2, minmax(0, 1fr))", "grid_gap": "8px"},
                ),
                self.status.widget,
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-sweep-panel")
        self.refresh_context()

    def refresh_library(self) -> None:
        names = self.library.names()
        current = self.vector.value if self.vector.value in names else RANDOM
        self.vector.options = [("random (seed)", RANDOM)] + [(name, name) for name in names]
        self.vector.value = current
        self._show_relevant()

    def _show_relevant(self) -> None:
        self.seed.layout.display = "" if self.vector.value == RANDOM else "none"
        self.unit.layout.display = "" if self.op.value == "add" else "none"

    def refresh_context(self) -> None:
        """Say how the sweep will run (chat turn or plain text), from the chat's state now."""
        system, history = self.context()
        self.context_label.value = f"<span style='color:#555'>{sweep_prompt(system, history, '')[1]}</span>"

    def run(self) -> Any:
        """Start the sweep; returns the bridge future (the table and plot update when it finishes)."""
        from vllm import SamplingParams

        model = self.engine.model
        layer, op = self.layer.value, self.op.value
        try:
            typed = parse_scales(self.scales.value)
            relative = op == "add" and self.unit.value == "typical"
            if relative and self.typical is None:
                raise SpecError("the typical norms are not measured yet; give scales in absolute units meanwhile")
            typical = self.typical.at(layer) if self.typical is not None else None
            scales = [s * typical for s in typed] if relative and typical is not None else typed
            unit = direction(
                RowState(layer, vector=self.vector.value, seed=self.seed.value), model.hidden_size, self.library
            )
        except Exception as error:
            self.status.report(error)
            return None
        system, history = self.context()
        prompt, how = sweep_prompt(system, history, self.prompt.value)
        self.context_label.value = f"<span style='color:#555'>{how}</span>"
        base = model.export_steering_spec() if self.stack.value else SteeringSpec()
        self.progress.value, self.progress.max = 0, len(scales)
        self.status.show(
            f"running {len(scales)} scales from {'the editor steering' if self.stack.value else 'no steering'}..."
        )

        def progress(done: int, total: int) -> None:
            self.progress.value = done

        def done(frame: Any, error: BaseException | None) -> None:
            if error is not None:
                self.status.report(error)
                return
            frame["relative"] = frame["scale"] / typical if typical else float("nan")
            frame["note"] = explain_rows(frame)
            self.frame = frame
            self.table.value = sweep_table(frame)
            replace_figure(self.figure, figures.build_sweep_figure(frame, layer, op))
            start = "the editor's steering" if self.stack.value else "no steering"
            self.status.show(f"{len(frame)} scales at layer {layer}, from {start}")

        sweep = model.sweep(
            prompt,
            layer,
            unit,
            scales,
            SamplingParams(temperature=0.0, max_tokens=self.max_tokens.value),
            op=op,
            base_spec=base,
            progress=progress,
        )
        self.last_future = self.engine.submit(sweep, done)
        return self.last_future


def _empty_sweep() -> pd.DataFrame:
    return pd.DataFrame({"scale": [], "proj_generated_mean": [], "text": pd.Series([], dtype=object)})
