"""Live plots of the latest turn's captures, baseline and steered side by side.

Controls: what to plot per token (the residual norm, or the projection on
one of the steering directions of that turn), the layer of the per-message
plots, whether the first (attention-sink) token counts, and the heatmap's
colour scale. Changing a control re-plots from the kept captures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.notebook import figures, summaries
from workbench.notebook.conversation import BASELINE, STEERED, TurnCaptures
from workbench.notebook.editor import OP_LABELS
from workbench.notebook.plot_widget import PlotWidget
from workbench.notebook.widgets import figure_cell, figure_grid, replace_figure
from workbench.specs import SteeringSpec
from workbench.tables import captures_frame

FRAME_COLUMNS = ["request", "layer", "position", "token_id", "token", "phase", "message", "role", "norm"]


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=FRAME_COLUMNS).astype(
        {"layer": int, "position": int, "message": int, "norm": float, "token": object, "request": object}
    )


def spec_directions(
    spec: SteeringSpec, names: dict[tuple[int, str], str] | None = None
) -> dict[str, tuple[str, torch.Tensor]]:
    """Every direction ``spec`` steers along: key -> (label, unit vector)."""
    directions = {}
    for layer, layer_spec in sorted(spec.layers.items()):
        for op in ("add", "projection_cap", "ablation"):
            if (op_spec := getattr(layer_spec, op)) is None:
                continue
            vector = op_spec.vector / op_spec.vector.norm()
            name = (names or {}).get((layer, op))
            label = f"the layer {layer} {OP_LABELS[op]} direction" + (f" ({name})" if name else "")
            directions[f"l{layer}_{op}"] = (label, vector)
    return directions


class ActivationsPanel:
    """Per-layer and per-message summaries, cosines and the token x layer heatmap."""

    def __init__(self, tokenizer: Any, layer_count: int, layer: int) -> None:
        self.tokenizer = tokenizer
        self._quiet = False
        """Set while the panel itself changes a control (no redraw then)."""
        self.captures: TurnCaptures | None = None
        self.frame = empty_frame()
        self.directions: dict[str, tuple[str, torch.Tensor]] = {}
        self.direction_names: Callable[[], dict[tuple[int, str], str]] = dict
        """(layer, op) -> the name of the editor's vector there, for the labels."""
        self.on_token_click: list[Callable[[str, int], None]] = []
        """Called with (branch label, token position) when a heatmap cell is clicked."""
        self.quantity = w.Dropdown(options=[(summaries.NORM.label, "norm")], value="norm", description="plot")
        self.layer = w.Dropdown(options=list(range(layer_count)), value=layer, description="message layer")
        self.include_first = w.Checkbox(value=False, description="include the first token", indent=False)
        self.colour = w.Dropdown(options=list(figures.COLOUR_SCALES), value="clipped", description="heatmap colours")
        for control in (self.quantity, self.layer, self.colour):
            control.style.description_width = "initial"
            control.layout.width = "auto"
            control.observe(self._control_changed, names="value")
        self.include_first.observe(self._control_changed, names="value")
        self.layer_means = PlotWidget(figures.build_layer_figure(self.frame))
        self.message_means = PlotWidget(figures.build_message_figure(self.frame, layer))
        self.layer_cosines = PlotWidget(figures.build_layer_cosine_figure(_empty_cosines()))
        self.message_cosines = PlotWidget(figures.build_cosine_heatmap_figure(_empty_message_cosines()))
        self.heatmap = PlotWidget(figures.build_token_heatmap_figure(self.frame))
        self.note = w.HTML("<i>The plots show the latest turn once a reply has come back.</i>")
        self.widget = w.VBox(
            [
                w.HBox(
                    [self.quantity, self.layer, self.include_first, self.colour],
                    layout={"flex_flow": "row wrap", "grid_gap": "12px", "width": "100%"},
                ),
                self.note,
                figure_grid([self.layer_means, self.message_means]),
                figure_grid([self.layer_cosines, self.message_cosines]),
                figure_cell(self.heatmap),
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-activations")

    def figures(self) -> dict[str, go.FigureWidget]:
        return {
            "layer_means": self.layer_means,
            "message_means": self.message_means,
            "layer_cosines": self.layer_cosines,
            "message_cosines": self.message_cosines,
            "token_heatmap": self.heatmap,
        }

    def show(self, captures: TurnCaptures) -> None:
        """Plot a finished turn (the previous turn's captures are released)."""
        previous, self.captures = self.captures, captures
        self.directions = spec_directions(captures.spec, self.direction_names())
        self.frame = captures_frame(
            captures.handles,
            self.tokenizer,
            directions={key: vector for key, (_, vector) in self.directions.items()},
            labels=captures.labels,
        )
        options = [(summaries.NORM.label, "norm")] + [(label, key) for key, (label, _) in self.directions.items()]
        chosen = self.quantity.value
        self._quiet = True
        self.quantity.options = options
        self.quantity.value = chosen if chosen in dict(options).values() else "norm"
        self._quiet = False
        self.note.value = ""
        self.redraw()
        if previous is not None:
            for handle in previous.handles:
                handle.close()

    def _control_changed(self, _: Any) -> None:
        if not self._quiet:
            self.redraw()

    def _heatmap_clicked(self, trace: Any, points: Any, _selector: Any) -> None:
        for position in points.xs[:1]:
            for listener in self.on_token_click:
                listener(trace.name, int(position))

    def _quantity(self) -> summaries.Quantity:
        key = self.quantity.value
        if key == "norm" or key not in self.directions:
            return summaries.NORM
        return summaries.projection(key, self.directions[key][0])

    def redraw(self) -> None:
        """Re-plot the kept captures with the controls' current values."""
        first = self.include_first.value
        quantity = self._quantity()
        replace_figure(self.layer_means, figures.build_layer_figure(self.frame, quantity, first))
        replace_figure(self.message_means, figures.build_message_figure(self.frame, self.layer.value, quantity, first))
        replace_figure(self.heatmap, figures.build_token_heatmap_figure(self.frame, quantity, self.colour.value, first))
        for trace in self.heatmap.data:
            trace.on_click(self._heatmap_clicked)
        if self.captures is None:
            return
        handles = dict(zip(self.captures.labels, self.captures.handles))
        steered, layer = handles[STEERED], self.layer.value
        replace_figure(
            self.message_cosines,
            figures.build_cosine_heatmap_figure(
                summaries.message_cosines(steered, layer, first), f"Cosine between messages at layer {layer} (steered)"
            ),
        )
        if BASELINE in handles:
            figure = figures.build_layer_cosine_figure(
                summaries.layer_cosines(handles[BASELINE], steered, "turn", first)
            )
        else:
            figure = figures.build_layer_cosine_figure(_empty_cosines())
            figure.update_layout(
                title_text="Cosine between baseline and steered: turn on compare in a new chat", title_subtitle_text=""
            )
        replace_figure(self.layer_cosines, figure)


def _empty_message_cosines() -> pd.DataFrame:
    return pd.DataFrame({"message_a": [], "message_b": [], "cosine": []})


def _empty_cosines() -> pd.DataFrame:
    return pd.DataFrame({"layer": [], "cosine": []})
