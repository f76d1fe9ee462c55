"""Pure figure builders: tidy DataFrames in, ``plotly.graph_objects.Figure`` out.

They know nothing of widgets, so scripts and tests use them directly and the
panels wrap them in ``FigureWidget``s. Inputs are the tables of
``workbench.tables`` (one row per token x layer) or the small summaries
below, which are computed from them.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.capture import CaptureHandle

LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}


def layer_norms(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean residual-stream norm per request and layer."""
    return frame.groupby(["request", "layer"], as_index=False)["norm"].mean()


def message_norms(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean norm per request and message (prompt rows of chat captures)."""
    chat = frame[(frame["message"] >= 0) & (frame["phase"] == "prompt")]
    return chat.groupby(["request", "layer", "message", "role"], as_index=False)["norm"].mean()


def build_layer_norm_figure(frame: pd.DataFrame) -> go.Figure:
    """Mean norm against layer, one line per request (e.g. baseline vs steered)."""
    summary = layer_norms(frame)
    figure = go.Figure(layout={**LAYOUT, "title": "Mean activation norm per layer"})
    for request, rows in summary.groupby("request", sort=False):
        figure.add_trace(go.Scatter(x=rows["layer"], y=rows["norm"], mode="lines+markers", name=str(request)))
    figure.update_xaxes(title="layer")
    figure.update_yaxes(title="mean norm")
    return figure


def build_message_norm_figure(frame: pd.DataFrame, layer: int) -> go.Figure:
    """Mean norm of each message at ``layer``, bars grouped by request, labelled by role."""
    summary = message_norms(frame[frame["layer"] == layer])
    figure = go.Figure(layout={**LAYOUT, "title": f"Mean norm per message (layer {layer})", "barmode": "group"})
    for request, rows in summary.groupby("request", sort=False):
        labels = [f"{m}: {r}" for m, r in zip(rows["message"], rows["role"])]
        figure.add_trace(go.Bar(x=labels, y=rows["norm"], name=str(request)))
    figure.update_xaxes(title="message")
    figure.update_yaxes(title="mean norm")
    return figure


def build_token_heatmap_figure(frame: pd.DataFrame, request: object | None = None) -> go.Figure:
    """Norm of every token (x) at every captured layer (y); token text on hover."""
    rows = frame if request is None else frame[frame["request"] == request]
    grid = rows.pivot_table(index="layer", columns="position", values="norm")
    tokens = rows.drop_duplicates("position").set_index("position").reindex(grid.columns)
    text = tokens["token"] if "token" in tokens else tokens["token_id"].astype(str)
    figure = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=list(grid.columns),
            y=list(grid.index),
            customdata=[list(text)] * len(grid.index),
            hovertemplate="layer %{y}, position %{x}<br>token %{customdata!r}<br>norm %{z:.2f}<extra></extra>",
            colorscale="Viridis",
            colorbar={"title": "norm"},
        ),
        layout={**LAYOUT, "title": "Activation norm per token and layer"},
    )
    figure.update_xaxes(title="token position")
    figure.update_yaxes(title="layer")
    return figure


def message_cosines(handle: CaptureHandle, layer: int) -> pd.DataFrame:
    """Cosine similarity between the mean vectors of every pair of messages (long format)."""
    means = torch.stack(
        [handle.get_message_activations(i, layer).float().mean(dim=0) for i in range(len(handle.message_boundaries))]
    )
    unit = torch.nn.functional.normalize(means, dim=-1)
    matrix = (unit @ unit.T).numpy()
    labels = [f"{i}: {b.role}" for i, b in enumerate(handle.message_boundaries)]
    return pd.DataFrame(
        [(a, b, float(matrix[i, j])) for i, a in enumerate(labels) for j, b in enumerate(labels)],
        columns=["message_a", "message_b", "cosine"],
    )


def layer_cosines(baseline: CaptureHandle, steered: CaptureHandle, prompt_only: bool = False) -> pd.DataFrame:
    """Per layer, cosine between the two captures' mean vectors over the rows
    both have (or only their prompt rows, which see the same tokens)."""
    records = []
    for layer in baseline.layer_indices:
        if layer not in steered.layer_indices:
            continue
        a, b = baseline.hidden(layer).float(), steered.hidden(layer).float()
        rows = min(a.shape[0], b.shape[0])
        if prompt_only:
            rows = min(rows, len(baseline.prompt_token_ids), len(steered.prompt_token_ids))
        cosine = torch.nn.functional.cosine_similarity(a[:rows].mean(0), b[:rows].mean(0), dim=0).item()
        records.append({"layer": layer, "cosine": cosine})
    return pd.DataFrame(records, columns=["layer", "cosine"])


def build_cosine_heatmap_figure(cosines: pd.DataFrame) -> go.Figure:
    """Heatmap of a ``message_cosines`` table."""
    grid = cosines.pivot(index="message_a", columns="message_b", values="cosine")
    order = list(dict.fromkeys(cosines["message_a"]))
    grid = grid.reindex(index=order, columns=order)
    figure = go.Figure(
        go.Heatmap(z=grid.to_numpy(), x=order, y=order, zmin=-1, zmax=1, colorscale="RdBu", colorbar={"title": "cos"}),
        layout={**LAYOUT, "title": "Cosine similarity between messages"},
    )
    figure.update_yaxes(autorange="reversed")
    return figure


def build_layer_cosine_figure(cosines: pd.DataFrame) -> go.Figure:
    """A ``layer_cosines`` table: how far steering turned the mean activation, per layer."""
    figure = go.Figure(
        go.Scatter(x=cosines["layer"], y=cosines["cosine"], mode="lines+markers", name="baseline vs steered"),
        layout={**LAYOUT, "title": "Cosine between baseline and steered, per layer"},
    )
    figure.update_xaxes(title="layer")
    figure.update_yaxes(title="cosine", range=[-1.05, 1.05])
    return figure


def build_sweep_figure(sweep: pd.DataFrame, metric: str = "proj_generated_mean") -> go.Figure:
    """A sweep's metric against scale, the text on hover."""
    figure = go.Figure(
        go.Scatter(
            x=sweep["scale"],
            y=sweep[metric],
            mode="lines+markers",
            customdata=sweep["text"].str.slice(0, 120),
            hovertemplate="scale %{x}<br>" + metric + " %{y:.3f}<br>%{customdata}<extra></extra>",
        ),
        layout={**LAYOUT, "title": f"{metric} against scale"},
    )
    figure.update_xaxes(title="scale")
    figure.update_yaxes(title=metric)
    return figure
