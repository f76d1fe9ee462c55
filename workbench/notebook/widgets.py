"""Small widget helpers the panels share: a status line, figures that fill
their column and survive a page reload, number fields that never change
what was typed."""

from __future__ import annotations

import html
import math
from copy import deepcopy
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.errors import SpecError

ERROR_COLOUR = "#b00020"
WARNING_COLOUR = "#8a5a00"


def error_html(error: BaseException) -> str:
    return f"<span style='color:{ERROR_COLOUR}'>{html.escape(type(error).__name__)}: {html.escape(str(error))}</span>"


class StatusLine:
    """One line of HTML under a panel: what the last action did, or why it failed."""

    def __init__(self) -> None:
        self.widget = w.HTML(layout={"min_height": "1.5em"})

    @property
    def value(self) -> str:
        return self.widget.value

    def show(self, text: str, colour: str = "") -> None:
        style = f" style='color:{colour}'" if colour else ""
        self.widget.value = f"<span{style}>{html.escape(text)}</span>" if text else ""

    def report(self, error: BaseException | None, ok: str = "") -> None:
        """``error`` in red, else ``ok``."""
        if error is not None:
            self.widget.value = error_html(error)
        else:
            self.show(ok)


def figure_cell(widget: go.FigureWidget) -> w.Box:
    """A box that gives a figure its column's width (a flex child otherwise
    takes the figure's own width, 700 px, and overflows narrow columns)."""
    return w.Box([widget], layout={"width": "100%", "min_width": "0", "overflow": "hidden"})


def figure_grid(widgets: list[go.FigureWidget], columns: int = 2) -> w.GridBox:
    """Figures in ``columns`` equal columns that shrink with the page."""
    return w.GridBox(
        [figure_cell(widget) for widget in widgets],
        layout={"grid_template_columns": f"repeat({columns}, minmax(0, 1fr))", "grid_gap": "8px", "width": "100%"},
    )


def replace_figure(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Show ``figure`` in ``widget``: traces and layout swapped in one message.

    A ``FigureWidget`` sends later changes as edit messages, while a page
    that reloads draws the widget from its saved state, which plotly fills
    only when the widget is first displayed. Copying the current data and
    layout into that state after each change (as plotly's own display does)
    makes a reloaded page draw the latest figure, not an empty one.
    """
    # Top-level layout keys the new figure lacks (a second subplot's axes) are
    # removed explicitly: assigning a layout updates the drawn one key by key.
    stale = set(widget.layout.to_plotly_json()) - set(figure.layout.to_plotly_json())
    with widget.batch_update():
        widget.data = []
        for key in stale:
            widget.layout[key] = None
    widget.layout = figure.layout
    widget.add_traces(list(figure.data))
    widget._widget_layout = deepcopy(widget._layout_obj._props)
    widget._widget_data = deepcopy(widget._data)


def parse_number(text: str, what: str, blank: bool = False) -> float | None:
    """``text`` as a finite number; an empty string is ``None`` when ``blank``
    allows it. Anything else raises ``SpecError`` naming ``what``."""
    stripped = text.strip()
    if not stripped:
        if blank:
            return None
        raise SpecError(f"{what} is empty")
    try:
        number = float(stripped)
    except ValueError:
        raise SpecError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(number):
        raise SpecError(f"{what} must be a finite number, got {text!r}")
    return number


def format_number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


class NumberEntry:
    """A slider for dragging and a text box for typing, kept in step.

    The text box is the value: what is typed stays as typed (``nan``, a value
    beyond the slider, a blank) and is parsed when the value is used; a number
    beyond the slider's range widens the range instead of being clamped.
    """

    def __init__(
        self, value: float | None, low: float, high: float, step: float, description: str = "", blank: bool = False
    ) -> None:
        self.blank = blank
        self.slider = w.FloatSlider(
            value=value if value is not None else (low + high) / 2,
            min=low,
            max=high,
            step=step,
            readout=False,
            continuous_update=False,
            layout={"flex": "1 1 auto", "min_width": "80px", "width": "auto"},
        )
        self.text = w.Text(value=format_number(value), layout={"width": "80px"}, continuous_update=True)
        self.label = w.Label(description, layout={"width": "auto", "min_width": "2.5em"})
        self.box = w.HBox([self.label, self.slider, self.text], layout={"width": "100%", "align_items": "center"})
        self._syncing = False
        self.slider.observe(self._from_slider, names="value")
        self.text.observe(self._from_text, names="value")

    def _from_slider(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self._syncing = True
            self.text.value = format_number(change["new"])
            self._syncing = False

    def _from_text(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        try:
            number = parse_number(change["new"], "value", blank=True)
        except SpecError:
            return
        if number is None:
            return
        self._syncing = True
        if number < self.slider.min:
            self.slider.min = number
        if number > self.slider.max:
            self.slider.max = number
        self.slider.value = number
        self._syncing = False

    def set(self, value: float | None) -> None:
        """Show ``value``."""
        self.text.value = format_number(value)

    def set_range(self, low: float, high: float) -> None:
        """Give the slider the range ``[low, high]``, widened to hold the typed value."""
        try:
            typed = parse_number(self.text.value, "value", blank=True)
        except SpecError:
            typed = None
        if typed is not None:
            low, high = min(low, typed), max(high, typed)
        self._syncing = True
        # Widen first, then narrow: the slider rejects a min above its max.
        self.slider.min, self.slider.max = min(low, self.slider.min), max(high, self.slider.max)
        self.slider.min, self.slider.max = low, high
        self._syncing = False

    def value(self, what: str) -> float | None:
        """The typed number (``SpecError`` naming ``what`` if it is not one)."""
        return parse_number(self.text.value, what, blank=self.blank)
