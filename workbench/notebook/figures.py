"""Pure figure builders: tidy DataFrames in, ``plotly.graph_objects.Figure`` out.

They know nothing of widgets, so scripts and tests use them directly and the
panels wrap them in ``FigureWidget``s. Inputs are the tables of
``workbench.tables`` (one row per token x layer) or the summaries of
``workbench.notebook.summaries``. Titles and axes are words; each figure
says when the first (attention-sink) token is left out.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.errors import WorkbenchError
from workbench.notebook.summaries import NORM, Quantity, layer_means, message_means, token_rows

LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "autosize": True,
    "height": 380,
    "margin": {"l": 60, "r": 20, "t": 95, "b": 50},
    "legend": {"orientation": "h", "x": 0, "y": 1.01, "yanchor": "bottom"},
}
"""No fixed width: a figure takes its column's width."""

COLOUR_SCALES = ("clipped", "linear", "log")
"""Heatmap colour scales: clipped to the 2nd..98th percentile, linear over
all values, or logarithmic (signed for projections, which can be negative)."""

CLIP_PERCENTILES = (2.0, 98.0)


def _title(text: str, include_first_token: bool | None = None, note: str = "") -> dict[str, Any]:
    """A title with its notes as plotly's subtitle (a two-line title text anchored at
    the top is drawn partly above the figure)."""
    notes = [note] if note else []
    if include_first_token is False:
        notes.append("first token left out")
    subtitle = {"text": html.escape("; ".join(notes)), "font": {"size": 12, "color": "#555"}}
    return {"text": html.escape(text), "subtitle": subtitle, "x": 0, "xanchor": "left", "y": 0.98, "yanchor": "top"}


def token_label(token: str) -> str:
    """A token as hover text: quoted (spaces and newlines visible), markup escaped."""
    return html.escape(repr(token), quote=False)


def build_layer_figure(frame: pd.DataFrame, quantity: Quantity = NORM, include_first_token: bool = False) -> go.Figure:
    """Mean ``quantity`` over tokens against layer, one line per request (e.g. baseline and steered)."""
    summary = layer_means(frame, quantity, include_first_token)
    figure = go.Figure(layout={**LAYOUT, "title": _title(f"Mean {quantity.label} per layer", include_first_token)})
    for request, rows in summary.groupby("request", sort=False):
        figure.add_trace(go.Scatter(x=rows["layer"], y=rows["value"], mode="lines+markers", name=str(request)))
    figure.update_xaxes(title="layer")
    figure.update_yaxes(title=f"mean {quantity.label}")
    return figure


def build_message_figure(
    frame: pd.DataFrame, layer: int, quantity: Quantity = NORM, include_first_token: bool = False
) -> go.Figure:
    """Mean ``quantity`` of each message (and the reply) at ``layer``, bars grouped by request."""
    summary = message_means(frame, layer, quantity, include_first_token)
    figure = go.Figure(
        layout={
            **LAYOUT,
            "title": _title(f"Mean {quantity.label} per message at layer {layer}", include_first_token),
            "barmode": "group",
        }
    )
    for request, rows in summary.groupby("request", sort=False):
        figure.add_trace(go.Bar(x=rows["message"], y=rows["value"], name=str(request)))
    figure.update_xaxes(title="message (index and role)")
    figure.update_yaxes(title=f"mean {quantity.label}")
    return figure


def _colour_values(values: np.ndarray, signed: bool, colour: str) -> np.ndarray:
    if colour != "log":
        return values
    if signed:
        return np.sign(values) * np.log10(1.0 + np.abs(values))
    return np.log10(np.maximum(values, 1e-6))


def _colour_range(values: np.ndarray, signed: bool, colour: str) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if colour != "clipped" or finite.size == 0:
        return {"cmid": 0.0} if signed else {}
    if signed:
        high = float(np.percentile(np.abs(finite), CLIP_PERCENTILES[1]))
        return {"cmin": -high, "cmax": high}
    low, high = (float(np.percentile(finite, p)) for p in CLIP_PERCENTILES)
    return {"cmin": low, "cmax": high}


def build_token_heatmap_figure(
    frame: pd.DataFrame,
    quantity: Quantity = NORM,
    colour: str = "clipped",
    include_first_token: bool = False,
    requests: list[Any] | None = None,
) -> go.Figure:
    """``quantity`` of every token (x) at every captured layer (y), one panel
    per request above each other with one shared colour scale; hovering a
    cell shows the token's text, layer, position and value."""
    if colour not in COLOUR_SCALES:
        raise WorkbenchError(f"colour must be one of {COLOUR_SCALES}, got {colour!r}")
    rows = token_rows(frame, include_first_token)
    requests = list(dict.fromkeys(rows["request"])) if requests is None else requests
    signed = quantity.column != NORM.column
    panels = max(len(requests), 1)
    figure = make_subplots(
        rows=panels, cols=1, subplot_titles=[str(r) for r in requests] or None, vertical_spacing=0.12 / panels
    )
    shown = []
    for index, request in enumerate(requests, start=1):
        part = rows[rows["request"] == request]
        grid = part.pivot_table(index="layer", columns="position", values=quantity.column)
        tokens = part.drop_duplicates("position").set_index("position")["token"].reindex(grid.columns)
        values = grid.to_numpy(dtype=float)
        shown.append(values.ravel())
        figure.add_trace(
            go.Heatmap(
                z=_colour_values(values, signed, colour),
                x=list(grid.columns),
                y=list(grid.index),
                text=[[token_label(str(t)) for t in tokens]] * len(grid.index),
                customdata=values,
                coloraxis="coloraxis",
                name=str(request),
                hovertemplate=(
                    "token %{text}<br>layer %{y}, position %{x}<br>"
                    + html.escape(quantity.label)
                    + " %{customdata:.2f}<extra>"
                    + html.escape(str(request))
                    + "</extra>"
                ),
            ),
            row=index,
            col=1,
        )
        figure.update_yaxes(title="layer", row=index, col=1)
    figure.update_xaxes(title="token position", row=panels, col=1)
    values = _colour_values(np.concatenate(shown), signed, colour) if shown else np.array([])
    prefix = "log10 " if colour == "log" and not signed else "signed log10 " if colour == "log" else ""
    figure.update_layout(
        **{**LAYOUT, "height": 120 + 260 * panels},
        title=_title(f"{quantity.label.capitalize()} per token and layer", include_first_token, f"{colour} colours"),
        coloraxis={
            "colorscale": "RdBu_r" if signed else "Viridis",
            "colorbar": {"title": {"text": prefix + quantity.label.split(" on ")[0]}},
            **_colour_range(values, signed, colour),
        },
    )
    return figure


def build_cosine_heatmap_figure(cosines: pd.DataFrame, title: str = "Cosine between messages") -> go.Figure:
    """Heatmap of a ``summaries.message_cosines`` table."""
    grid = cosines.pivot(index="message_a", columns="message_b", values="cosine")
    order = list(dict.fromkeys(cosines["message_a"]))
    grid = grid.reindex(index=order, columns=order)
    figure = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=order,
            y=order,
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
            colorbar={"title": {"text": "cosine"}},
            hovertemplate="%{y} and %{x}<br>cosine %{z:.3f}<extra></extra>",
        ),
        layout={**LAYOUT, "title": _title(title, False, "mean vector of each message")},
    )
    figure.update_yaxes(autorange="reversed")
    return figure


LAYER_COSINE_NOTES = {
    "turn": "mean over this turn (the last user message and the reply)",
    "shared": "mean over the rows both have",
    "prompt": "mean over the prompt rows",
}


def build_layer_cosine_figure(cosines: pd.DataFrame, rows: str = "turn") -> go.Figure:
    """A ``summaries.layer_cosines`` table: how far steering turned the mean activation, per layer."""
    figure = go.Figure(
        go.Scatter(x=cosines["layer"], y=cosines["cosine"], mode="lines+markers", name="baseline vs steered"),
        layout={
            **LAYOUT,
            "title": _title("Cosine between baseline and steered, per layer", False, LAYER_COSINE_NOTES[rows]),
        },
    )
    figure.update_xaxes(title="layer")
    figure.update_yaxes(title="cosine of the mean vectors", range=[-1.05, 1.05])
    return figure


SWEEP_AXES = {
    "add": "scale (norm of the added vector)",
    "ablation": "kept fraction of the component on the direction",
}


def build_sweep_figure(sweep: pd.DataFrame, layer: int | None = None, op: str = "add") -> go.Figure:
    """A sweep (``workbench.sweep``): the mean projection of the generated
    tokens on the direction against scale, each reply (or why it is empty) on hover."""
    notes = sweep["note"] if "note" in sweep else pd.Series([""] * len(sweep), dtype=object)
    hover = [note or str(text)[:120] for text, note in zip(sweep["text"], notes)]
    where = f" at layer {layer}" if layer is not None else ""
    figure = go.Figure(
        go.Scatter(
            x=sweep["scale"],
            y=sweep["proj_generated_mean"],
            mode="lines+markers",
            customdata=[html.escape(text, quote=False) for text in hover],
            hovertemplate="scale %{x}<br>projection %{y:.2f}<br>%{customdata}<extra></extra>",
        ),
        layout={
            **LAYOUT,
            "title": _title(f"Projection on the direction{where} against scale", None, "mean over generated tokens"),
        },
    )
    figure.update_xaxes(title=SWEEP_AXES.get(op, "scale"))
    figure.update_yaxes(title="mean projection on the direction")
    return figure
