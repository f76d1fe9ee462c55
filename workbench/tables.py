"""Captures as tidy pandas tables: one row per token x layer.

Columns: ``request`` (the handle's position in the list, or a label),
``layer``, ``position`` (row in the capture = token index in the sequence),
``token_id``, ``token`` (text, when a tokenizer is given), ``phase``
("prompt" or "generated"), ``message`` and ``role`` (chat captures; -1 and
"" otherwise; generated rows belong to the last message), ``norm``, and
``proj_<name>`` for each direction given (projection on the unit direction).
This is the format the workbench's figures are built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.capture import CaptureHandle
from workbench.errors import CaptureError


def _message_columns(handle: CaptureHandle, rows: int) -> tuple[np.ndarray, np.ndarray]:
    messages = np.full(rows, -1, dtype=np.int64)
    roles = np.full(rows, "", dtype=object)
    for index, boundary in enumerate(handle.message_boundaries):
        messages[boundary.start : boundary.end] = index
        roles[boundary.start : boundary.end] = boundary.role
    if handle.message_boundaries:
        last = handle.message_boundaries[-1]
        messages[last.end :] = len(handle.message_boundaries) - 1
        roles[last.end :] = last.role
    return messages, roles


def capture_frame(
    handle: CaptureHandle,
    tokenizer: Any = None,
    directions: Mapping[str, Tensor] | None = None,
    request: Any = 0,
) -> pd.DataFrame:
    """One fetched handle as a tidy table (see the module docstring)."""
    directions = {name: (d.float() / d.float().norm()) for name, d in (directions or {}).items()}
    layers = list(handle.layer_indices)
    rows = handle.expected_rows
    ids = np.array((handle.prompt_token_ids + handle.generated_token_ids)[:rows], dtype=np.int64)
    tokens = np.array([tokenizer.decode([i]) for i in ids], dtype=object) if tokenizer is not None else None
    messages, roles = _message_columns(handle, rows)
    phase = np.where(np.arange(rows) < len(handle.prompt_token_ids), "prompt", "generated")
    frames = []
    for layer in layers:
        hidden = handle.hidden(layer).float()
        columns: dict[str, Any] = {
            "request": request,
            "layer": layer,
            "position": np.arange(rows),
            "token_id": ids,
            "phase": phase,
            "message": messages,
            "role": roles,
            "norm": torch.linalg.vector_norm(hidden, dim=-1).numpy(),
        }
        if tokens is not None:
            columns["token"] = tokens
        for name, direction in directions.items():
            columns[f"proj_{name}"] = (hidden @ direction).numpy()
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)


def captures_frame(
    handles: Sequence[CaptureHandle],
    tokenizer: Any = None,
    directions: Mapping[str, Tensor] | None = None,
    labels: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Several handles in one table; ``request`` is each handle's label (default: its index)."""
    labels = list(labels) if labels is not None else list(range(len(handles)))
    if len(labels) != len(handles):
        raise CaptureError(f"{len(labels)} labels for {len(handles)} handles")
    return pd.concat(
        [capture_frame(handle, tokenizer, directions, label) for handle, label in zip(handles, labels)],
        ignore_index=True,
    )
