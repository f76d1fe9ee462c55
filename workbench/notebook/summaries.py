"""Small tables the workbench plots, computed from captures.

Inputs are the tidy token x layer tables of ``workbench.tables`` or fetched
capture handles. The first token of a sequence is an attention sink: its
residual norm is often ten or more times every other token's, so a mean
over tokens that includes it mostly measures that one token. Every summary
here leaves it out unless ``include_first_token=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from workbench.capture import CaptureHandle
from workbench.errors import CaptureError

REPLY = "reply"
"""The message label of generated rows in per-message summaries."""


@dataclass(frozen=True)
class Quantity:
    """A per-token value of the tidy table: its column and how figures name it."""

    column: str
    label: str


NORM = Quantity("norm", "residual norm")


def projection(name: str, label: str) -> Quantity:
    """The ``proj_<name>`` column of ``tables.captures_frame(..., directions={name: ...})``."""
    return Quantity(f"proj_{name}", f"projection on {label}")


def token_rows(frame: pd.DataFrame, include_first_token: bool = False) -> pd.DataFrame:
    """``frame`` without each sequence's first token (unless asked for)."""
    return frame if include_first_token else frame[frame["position"] > 0]


def layer_means(frame: pd.DataFrame, quantity: Quantity = NORM, include_first_token: bool = False) -> pd.DataFrame:
    """Mean of ``quantity`` over tokens, per request and layer (columns request, layer, value)."""
    rows = token_rows(frame, include_first_token)
    summary = rows.groupby(["request", "layer"], as_index=False, sort=False)[quantity.column].mean()
    return summary.rename(columns={quantity.column: "value"})


def message_means(
    frame: pd.DataFrame, layer: int, quantity: Quantity = NORM, include_first_token: bool = False
) -> pd.DataFrame:
    """Mean of ``quantity`` per request and message at ``layer``: each prompt
    message (``"<index> <role>"``), then the generated rows as ``"reply"``.
    Columns request, message, value."""
    rows = token_rows(frame[(frame["layer"] == layer) & (frame["message"] >= 0)], include_first_token)
    prompt = rows["phase"] == "prompt"
    request_order = {request: index for index, request in enumerate(dict.fromkeys(frame["request"]))}
    rows = rows.assign(
        label=(rows["message"].astype(str) + " " + rows["role"]).where(prompt, REPLY),
        order=rows["message"].where(prompt, rows["message"].max() + 1),  # the reply last
        request_order=rows["request"].map(request_order),
    )
    summary = rows.groupby(["request_order", "request", "order", "label"], as_index=False)[quantity.column].mean()
    return summary.rename(columns={"label": "message", quantity.column: "value"})[["request", "message", "value"]]


def _mean_rows(handle: CaptureHandle, layer: int, start: int, end: int, include_first_token: bool) -> torch.Tensor:
    rows = handle.hidden(layer).float()[start:end]
    if start == 0 and not include_first_token:
        rows = rows[1:]
    return rows.mean(dim=0)


def message_cosines(handle: CaptureHandle, layer: int, include_first_token: bool = False) -> pd.DataFrame:
    """Cosine between the mean vectors of every pair of messages at ``layer``
    (long format: message_a, message_b, cosine)."""
    boundaries = handle.message_boundaries
    if not boundaries:
        raise CaptureError("message cosines need a chat capture (one with message boundaries)")
    means = torch.stack(
        [_mean_rows(handle, layer, b.start, b.end, include_first_token) for b in boundaries if b.end - b.start > 0]
    )
    unit = torch.nn.functional.normalize(means, dim=-1)
    matrix = (unit @ unit.T).numpy()
    labels = [f"{i} {b.role}" for i, b in enumerate(boundaries) if b.end - b.start > 0]
    return pd.DataFrame(
        [(a, b, float(matrix[i, j])) for i, a in enumerate(labels) for j, b in enumerate(labels)],
        columns=["message_a", "message_b", "cosine"],
    )


LAYER_COSINE_ROWS = ("turn", "shared", "prompt")
"""Which rows ``layer_cosines`` averages: this turn of each conversation (from
the last user message on, the reply included), the rows both captures have,
or only prompt rows (the same tokens when both saw the same prompt)."""


def _turn_start(handle: CaptureHandle) -> int:
    users = [b.start for b in handle.message_boundaries if b.role == "user"]
    return users[-1] if users else 0


def layer_cosines(
    baseline: CaptureHandle, steered: CaptureHandle, rows: str = "turn", include_first_token: bool = False
) -> pd.DataFrame:
    """Per layer, the cosine between the two captures' mean vectors (columns
    layer, cosine); ``rows`` is one of ``LAYER_COSINE_ROWS``."""
    if rows not in LAYER_COSINE_ROWS:
        raise CaptureError(f"rows must be one of {LAYER_COSINE_ROWS}, got {rows!r}")
    records = []
    for layer in baseline.layer_indices:
        if layer not in steered.layer_indices:
            continue
        means = []
        for handle in (baseline, steered):
            total = handle.hidden(layer).shape[0]
            if rows == "turn":
                start, end = _turn_start(handle), total
            elif rows == "prompt":
                start, end = 0, min(len(baseline.prompt_token_ids), len(steered.prompt_token_ids))
            else:
                start, end = 0, min(baseline.hidden(layer).shape[0], steered.hidden(layer).shape[0])
            means.append(_mean_rows(handle, layer, start, end, include_first_token))
        cosine = torch.nn.functional.cosine_similarity(means[0], means[1], dim=0).item()
        records.append({"layer": layer, "cosine": cosine})
    return pd.DataFrame(records, columns=["layer", "cosine"])
