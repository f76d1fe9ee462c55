"""The logit lens of one token, baseline and steered side by side.

For the selected token, each captured layer's residual row is read out
through the model's own final norm and unembedding (``model.logit_lens``, in
the workers where those weights are) as the top-k next tokens. The two
branches are aligned on the end of their prompts: offset -1 is the last
prompt token (whose lens predicts the first reply token), 0 the first reply
token, and so on; the prompt rows before the turn's user message differ
between branches (their histories differ), so only this turn is offered.
Clicking a cell of the token x layer heatmap selects its token.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w
import torch

from workbench.capture import CaptureHandle
from workbench.notebook.conversation import STEERED, TurnCaptures
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.figures import token_label
from workbench.notebook.widgets import StatusLine

Lens = list[list[tuple[int, str, float]]]
"""Per layer, the top-k ``(token id, text, probability)``."""

TOP_K_MAX = 20


def _token_ids(handle: CaptureHandle) -> tuple[int, ...]:
    return (handle.prompt_token_ids + handle.generated_token_ids)[: handle.expected_rows]


def row_at(handle: CaptureHandle, offset: int) -> int | None:
    """The capture row ``offset`` tokens after the end of the prompt (``None`` when the branch has no such row)."""
    row = len(handle.prompt_token_ids) + offset
    return row if 0 <= row < handle.expected_rows else None


def turn_offsets(handle: CaptureHandle) -> list[int]:
    """The offsets of this turn's rows: from the last user message to the last captured row."""
    users = [b.start for b in handle.message_boundaries if b.role == "user"]
    start = users[-1] if users else 0
    return list(range(start - len(handle.prompt_token_ids), handle.expected_rows - len(handle.prompt_token_ids)))


def offset_label(handle: CaptureHandle, offset: int, tokenizer: Any) -> str:
    """How the token chooser names an offset: where it is and the steered branch's token there."""
    row = row_at(handle, offset)
    where = f"prompt {offset}" if offset < 0 else f"reply {offset}"
    token = tokenizer.decode([_token_ids(handle)[row]]) if row is not None else ""
    return f"{where}: {token!r}"


def lens_rows(handle: CaptureHandle, row: int) -> torch.Tensor:
    """Row ``row`` of every captured layer, ``[layers, hidden]``."""
    return torch.stack([handle.hidden(layer)[row].float() for layer in handle.layer_indices])


def next_token(handle: CaptureHandle, row: int, tokenizer: Any) -> str:
    """The token that actually followed ``row`` in this branch ("" after the last one)."""
    ids = handle.prompt_token_ids + handle.generated_token_ids
    return tokenizer.decode([ids[row + 1]]) if row + 1 < len(ids) else ""


def lens_table(layers: list[int], lenses: dict[str, Lens | None], headers: dict[str, str]) -> str:
    """The lens as an HTML table: one row per layer, one column per branch,
    each cell the top-k tokens with their probabilities (top one in bold)."""
    labels = list(lenses)
    head = "".join(
        f"<th>{html.escape(label)}<br><span class='wb-lens-note'>{headers[label]}</span></th>" for label in labels
    )
    body = []
    for index, layer in enumerate(layers):
        cells = []
        for label in labels:
            lens = lenses[label]
            if lens is None:
                cells.append("<td>—</td>")
                continue
            parts = [
                f"{token_label(text)}&nbsp;{prob:.2f}" if rank else f"<b>{token_label(text)}&nbsp;{prob:.2f}</b>"
                for rank, (_, text, prob) in enumerate(lens[index])
            ]
            cells.append(f"<td>{', '.join(parts)}</td>")
        body.append(f"<tr><td>{layer}</td>{''.join(cells)}</tr>")
    return f"<table class='wb-lens'><thead><tr><th>layer</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class LensPanel:
    """Top-k next tokens of one token at every captured layer, per branch."""

    def __init__(self, engine: NotebookEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.model.tokenizer
        self.captures: TurnCaptures | None = None
        self._quiet = False
        self.token = w.Dropdown(options=[], description="lens token", layout={"width": "auto", "max_width": "100%"})
        self.top_k = w.BoundedIntText(value=5, min=1, max=TOP_K_MAX, description="top k", layout={"width": "140px"})
        for control in (self.token, self.top_k):
            control.style.description_width = "initial"
            control.observe(self._control_changed, names="value")
        self.table = w.HTML(layout={"overflow": "auto", "max_height": "520px", "width": "100%"})
        self.status = StatusLine()
        self.status.show("The logit lens reads the latest turn once a reply has come back.")
        self.last_future: Any = None
        self.widget = w.VBox(
            [
                w.HTML(
                    "<b>Logit lens</b> <span style='color:#555'>top next tokens from each layer's residual "
                    "(final norm and unembedding); click a heatmap cell to pick its token</span>"
                ),
                w.HBox([self.token, self.top_k], layout={"flex_flow": "row wrap", "grid_gap": "12px"}),
                self.table,
                self.status.widget,
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-lens-panel")

    def show(self, captures: TurnCaptures) -> Any:
        """Offer the new turn's tokens (the last prompt token chosen) and read it out."""
        self.captures = captures
        steered = self._handles()[STEERED]
        offsets = turn_offsets(steered)
        self._quiet = True
        self.token.options = [(offset_label(steered, o, self.tokenizer), o) for o in offsets]
        self.token.value = -1 if -1 in offsets else offsets[-1]
        self._quiet = False
        return self.read()

    def select(self, label: str, position: int) -> Any:
        """Pick the token at ``position`` of branch ``label`` (a heatmap click)."""
        if self.captures is None or label not in self._handles():
            return None
        offset = position - len(self._handles()[label].prompt_token_ids)
        if offset not in dict(self.token.options).values():
            self.status.show(f"position {position} is before this turn; the lens reads this turn's tokens")
            return None
        self.token.value = offset
        return self.last_future

    def _handles(self) -> dict[str, CaptureHandle]:
        return dict(zip(self.captures.labels, self.captures.handles)) if self.captures is not None else {}

    def _control_changed(self, _: Any) -> None:
        if not self._quiet and self.captures is not None:
            self.read()

    def read(self) -> Any:
        """Read the selected token through the lens in every branch (on the engine; returns the future)."""
        if self.captures is None or self.token.value is None:
            return None
        model, offset, top_k = self.engine.model, self.token.value, self.top_k.value
        handles = self._handles()
        rows = {label: row_at(handle, offset) for label, handle in handles.items()}
        layers = list(handles[STEERED].layer_indices)
        inputs = {label: lens_rows(handles[label], row) for label, row in rows.items() if row is not None}
        headers = {}
        for label, row in rows.items():
            if row is None:
                headers[label] = "no token here (a shorter reply)"
            else:
                token = self.tokenizer.decode([_token_ids(handles[label])[row]])
                after = next_token(handles[label], row, self.tokenizer)
                headers[label] = f"reads {token_label(token)}; next was {token_label(after)}"
        self.status.show("reading the lens...")

        async def run() -> dict[str, Lens | None]:
            lenses: dict[str, Lens | None] = {label: None for label in handles}
            for label, hidden in inputs.items():
                lenses[label] = await model.logit_lens(hidden, top_k=top_k)
            return lenses

        def done(lenses: dict[str, Lens | None] | None, error: BaseException | None) -> None:
            if error is not None or lenses is None:
                self.status.report(error)
                return
            self.table.value = lens_table(layers, lenses, headers)
            self.status.show(f"top {top_k} next tokens at {len(layers)} layers, {self.token.label}")

        self.last_future = self.engine.submit(run(), done)
        return self.last_future
