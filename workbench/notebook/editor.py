"""The steering editor: rows of layer, op, direction and scale; Apply swaps
the model's spec atomically.

What the rows describe is a plain function (``rows_to_spec``), testable
without widgets. Input is never silently changed: a layer out of range, a
scale that is not a finite number, a cap with min > max, a message index
that is not a whole number in range or two rows with one layer and op leave
the typed values as they are, apply nothing and say why in the status line.
Until Apply succeeds, edits show as "modified, not applied".

Each row targets tokens by name (all, prompt, generated, a chat role) or one
chat message by its index ("message #" and the index typed beside it).

Scales have units. A direction is used as a unit vector (the saved vector's
own norm is shown beside it), so an add's scale is the norm of what is added
and cap bounds are projections, both in residual-stream units; next to each
the layer's typical residual norm (``residual_norms``) gives the scale as a
multiple of it. A toggle switches which of the two units is typed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as w
import torch

from workbench.errors import SpecError
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.residual_norms import TypicalNorms
from workbench.notebook.widgets import WARNING_COLOUR, NumberEntry, StatusLine, format_number
from workbench.ops import MAX_MESSAGE, OP_NAMES
from workbench.specs import (
    POSITIONS,
    AblationSpec,
    AddSpec,
    LayerSteeringSpec,
    Positions,
    ProjectionCapSpec,
    SteeringSpec,
    check_layer_index,
)
from workbench.vector_library import VectorLibrary

OP_LABELS = dict(zip(OP_NAMES, ("add", "cap", "ablate")))
"""Short labels the editor shows for each op."""

RANDOM = "random"
"""The direction source of a row whose vector is drawn from a seed."""

UNITS = {"absolute": "absolute", "typical": "× typical norm"}
"""What a typed scale means: residual-stream units, or a multiple of the layer's typical norm."""

MESSAGE = "message"
"""The target choice that reads a message index from the row's index box."""


def parse_message_index(text: str, where: str) -> int:
    """A typed message index (``SpecError`` naming ``where`` unless it is a whole number in 0..MAX_MESSAGE)."""
    stripped = text.strip().removeprefix("#").strip()
    if not re.fullmatch(r"[0-9]+", stripped):
        raise SpecError(f"{where}: message index must be a whole number from 0 to {MAX_MESSAGE}, got {text!r}")
    index = int(stripped)
    if index > MAX_MESSAGE:
        raise SpecError(f"{where}: message index {index} is outside 0..{MAX_MESSAGE}")
    return index


def positions_label(positions: Positions) -> str:
    """A target as the editor shows it: a name, or ``message <index>``."""
    return f"{MESSAGE} {positions}" if isinstance(positions, int) else positions


@dataclass
class RowState:
    """One steering row of the editor, as plain values in residual-stream units."""

    layer: int
    op: str = "add"
    """One of ``ops.OP_NAMES``."""
    vector: str = RANDOM
    """``RANDOM`` (drawn from ``seed``) or the name of a vector in the library."""
    seed: int = 0
    scale: float = 4.0
    """add: the norm of the added vector; ablate: the kept fraction of the component."""
    cap_min: float | None = -5.0
    """Lowest projection a cap allows (``None``: no lower bound)."""
    cap_max: float | None = 5.0
    positions: Positions = "all"
    """Tokens the op applies to: one of ``specs.POSITIONS``, or a chat message's index."""
    enabled: bool = True

    def name(self) -> str:
        """The direction, as the spec text shows it."""
        return f"random (seed {self.seed})" if self.vector == RANDOM else self.vector


def direction(row: RowState, hidden_size: int, library: VectorLibrary | None) -> torch.Tensor:
    """The row's unit direction."""
    vector = raw_vector(row, hidden_size, library)
    return vector / vector.norm()


def raw_vector(row: RowState, hidden_size: int, library: VectorLibrary | None) -> torch.Tensor:
    """The row's vector before normalising (a seeded draw, or the library's vector as saved)."""
    if row.vector == RANDOM:
        return torch.randn(hidden_size, generator=torch.Generator().manual_seed(row.seed))
    if library is None:
        raise SpecError(f"row for layer {row.layer} names vector {row.vector!r} but no library folder is set")
    vector, _ = library.load(row.vector)
    return vector


def rows_to_spec(
    rows: Sequence[RowState], hidden_size: int, library: VectorLibrary | None = None, layer_count: int | None = None
) -> SteeringSpec:
    """The spec the editor's rows describe. Disabled rows are skipped; a layer
    outside ``layer_count`` layers, two enabled rows with the same layer and
    op, or an invalid value raise ``SpecError`` (nothing is merged or clamped)."""
    layers: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not row.enabled:
            continue
        if row.op not in OP_NAMES:
            raise SpecError(f"unknown op {row.op!r}; known: {list(OP_NAMES)}")
        if layer_count is not None:
            check_layer_index(row.layer, layer_count)
        ops = layers.setdefault(row.layer, {})
        if row.op in ops:
            raise SpecError(
                f"two rows set {OP_LABELS[row.op]!r} on layer {row.layer}; one layer takes each op once "
                "(remove or disable one of them)"
            )
        unit = direction(row, hidden_size, library)
        if row.op == "add":
            ops["add"] = AddSpec(unit, scale=row.scale, positions=row.positions)
        elif row.op == "projection_cap":
            ops["projection_cap"] = ProjectionCapSpec(unit, min=row.cap_min, max=row.cap_max, positions=row.positions)
        else:
            ops["ablation"] = AblationSpec(unit, scale=row.scale, positions=row.positions)
    return SteeringSpec({layer: LayerSteeringSpec(**ops) for layer, ops in layers.items()})


def rows_from_spec(spec: SteeringSpec, library: VectorLibrary, prefix: str) -> list[RowState]:
    """Editor rows that rebuild ``spec``: each direction goes into ``library``
    as ``<prefix>-<layer>-<op>`` (an add as its unit direction and its norm as the scale)."""
    rows = []
    for layer, layer_spec in sorted(spec.layers.items()):
        if (add := layer_spec.add) is not None:
            norm = float(add.effect.norm())
            library.save(name := f"{prefix}-{layer}-add", add.effect / norm)
            rows.append(RowState(layer, "add", name, scale=norm, positions=add.positions))
        if (cap := layer_spec.projection_cap) is not None:
            library.save(name := f"{prefix}-{layer}-cap", cap.vector)
            rows.append(
                RowState(layer, "projection_cap", name, cap_min=cap.min, cap_max=cap.max, positions=cap.positions)
            )
        if (ablation := layer_spec.ablation) is not None:
            library.save(name := f"{prefix}-{layer}-ablate", ablation.vector)
            rows.append(RowState(layer, "ablation", name, scale=ablation.scale, positions=ablation.positions))
    return rows


def _relative(value: float | None, typical: float | None) -> str:
    if value is None:
        return "open"
    if typical is None:
        return format_number(value)
    return f"{format_number(value)} ({value / typical:.3g}× typical {typical:.3g})"


def describe_rows(rows: Sequence[RowState], typical: TypicalNorms | None = None) -> str:
    """The applied rows as an HTML table that names each row's vector."""
    enabled = [row for row in rows if row.enabled]
    if not enabled:
        return "<i>no steering applied</i>"
    cells = []
    for row in enabled:
        norm = typical.at(row.layer) if typical is not None else None
        if row.op == "add":
            amount = "norm " + _relative(row.scale, norm)
        elif row.op == "projection_cap":
            amount = f"projection in [{_relative(row.cap_min, norm)}, {_relative(row.cap_max, norm)}]"
        else:
            amount = f"keeps {format_number(row.scale)} of the component"
        values = (row.layer, OP_LABELS[row.op], row.name(), amount, positions_label(row.positions))
        cells.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>")
    header = "".join(f"<th>{name}</th>" for name in ("layer", "op", "vector", "amount", "tokens"))
    return f"<table class='wb-spec'><tr>{header}</tr>{''.join(cells)}</table>"


class SteeringRow:
    """Widgets of one ``RowState``; ``state()`` reads them back (``SpecError`` on bad input)."""

    def __init__(self, editor: SteeringPanel, state: RowState) -> None:
        self.editor = editor
        self.enabled = w.Checkbox(value=state.enabled, description="on", indent=False, layout={"width": "48px"})
        self.layer = w.IntText(value=state.layer, description="layer", layout={"width": "130px"})
        self.layer.style.description_width = "36px"
        self.op = w.Dropdown(
            options=[(label, name) for name, label in OP_LABELS.items()], value=state.op, layout={"width": "84px"}
        )
        message = isinstance(state.positions, int)
        self.positions = w.Dropdown(
            options=[(name, name) for name in POSITIONS] + [("message #", MESSAGE)],
            value=MESSAGE if message else state.positions,
            tooltip="tokens the op acts on: all, the prompt's, the generated ones, a role's messages, or one message",
            layout={"width": "110px"},
        )
        self.message = w.Text(
            value=str(state.positions) if message else "",
            placeholder="index",
            tooltip="index of the chat message (0: the first, the system prompt when there is one)",
            layout={"width": "64px"},
        )
        remove = w.Button(icon="trash", tooltip="remove row", layout={"width": "36px"})
        remove.on_click(lambda _: editor.remove_row(self))
        self.vector = w.Dropdown(layout={"width": "190px"}, tooltip="direction: a seeded random vector or a saved one")
        self.seed = w.IntText(value=state.seed, description="seed", layout={"width": "120px"})
        self.seed.style.description_width = "32px"
        self.norm = w.HTML(layout={"width": "auto"})
        self.scale = NumberEntry(state.scale, -100.0, 100.0, 0.5, "scale")
        self.cap_min = NumberEntry(state.cap_min, -100.0, 100.0, 0.5, "min", blank=True)
        self.cap_max = NumberEntry(state.cap_max, -100.0, 100.0, 0.5, "max", blank=True)
        self.units = w.HTML(layout={"width": "100%"})
        self.set_vector_options(editor.library.names(), state.vector)
        self.box = w.VBox(
            [
                w.HBox(
                    [self.enabled, self.layer, self.op, self.positions, self.message, remove],
                    layout={"flex_flow": "row wrap"},
                ),
                w.HBox([self.vector, self.seed, self.norm], layout={"align_items": "center"}),
                self.scale.box,
                self.cap_min.box,
                self.cap_max.box,
                self.units,
            ],
            layout={"border_bottom": "1px solid #ddd", "padding": "2px 0", "width": "100%"},
        )
        for widget in (self.op, self.vector, self.positions):
            widget.observe(lambda _: self.refresh(), names="value")
        for widget in (self.enabled, self.layer, self.positions, self.message, self.seed, self.op, self.vector):
            widget.observe(lambda _: editor.changed(), names="value")
        for entry in (self.scale, self.cap_min, self.cap_max):
            entry.text.observe(lambda _: editor.changed(), names="value")
        self.layer.observe(lambda _: self.refresh(), names="value")
        self.refresh()

    def set_vector_options(self, names: list[str], value: str | None = None) -> None:
        """Offer ``names`` (the library's vectors); a chosen name that is gone stays, marked missing."""
        value = self.vector.value if value is None else value
        options = [("random (seed)", RANDOM)] + [(name, name) for name in names]
        if value not in (RANDOM, *names):
            options.append((f"{value} (missing)", value))
        self.vector.options = options
        self.vector.value = value

    def refresh(self) -> None:
        """Show the widgets the op needs and the other unit of each value."""
        cap = self.op.value == "projection_cap"
        self.scale.box.layout.display = "none" if cap else ""
        self.cap_min.box.layout.display = self.cap_max.box.layout.display = "" if cap else "none"
        self.scale.label.value = "keep" if self.op.value == "ablation" else "scale"
        self.seed.layout.display = "" if self.vector.value == RANDOM else "none"
        self.message.layout.display = "" if self.positions.value == MESSAGE else "none"
        self.norm.value = self.editor.norm_text(self.vector.value, self.seed.value)
        low, high = self.editor.slider_range(self.op.value, self.layer.value)
        for entry in (self.scale, self.cap_min, self.cap_max):
            entry.set_range(low, high)
        self.units.value = self.editor.units_text(self)

    def state(self, to_absolute: Callable[[float | None, int], float | None]) -> RowState:
        """The row's values; typed scales go through ``to_absolute(value, layer)``."""
        where = f"row for layer {self.layer.value} ({OP_LABELS[self.op.value]})"
        layer = self.layer.value
        if self.op.value == "ablation":
            scale = self.scale.value(f"{where}: keep")
        else:
            scale = to_absolute(self.scale.value(f"{where}: scale"), layer)
        return RowState(
            layer=layer,
            op=self.op.value,
            vector=self.vector.value,
            seed=self.seed.value,
            scale=scale if scale is not None else 0.0,
            cap_min=to_absolute(self.cap_min.value(f"{where}: min"), layer),
            cap_max=to_absolute(self.cap_max.value(f"{where}: max"), layer),
            positions=self.target(where),
            enabled=self.enabled.value,
        )

    def target(self, where: str) -> Positions:
        """The chosen tokens: a name of ``specs.POSITIONS``, or the typed message index."""
        if self.positions.value == MESSAGE:
            return parse_message_index(self.message.value, where)
        return self.positions.value

    def show(self, state: RowState, from_absolute: Callable[[float | None, int], float | None]) -> None:
        """Put ``state``'s values in the widgets, in the editor's unit."""
        scale = state.scale if state.op == "ablation" else from_absolute(state.scale, state.layer)
        self.scale.set(scale)
        self.cap_min.set(from_absolute(state.cap_min, state.layer))
        self.cap_max.set(from_absolute(state.cap_max, state.layer))

    def snapshot(self) -> tuple[Any, ...]:
        """Every typed value, to tell an edited row from the applied one."""
        return (
            self.enabled.value,
            self.layer.value,
            self.op.value,
            self.positions.value,
            self.message.value if self.positions.value == MESSAGE else "",
            self.vector.value,
            self.seed.value,
            self.scale.text.value,
            self.cap_min.text.value,
            self.cap_max.text.value,
        )


class SteeringPanel:
    """Edit steering row by row; Apply swaps the model's spec atomically."""

    def __init__(self, engine: NotebookEngine, library: VectorLibrary) -> None:
        self.engine = engine
        self.library = library
        self.typical: TypicalNorms | None = None
        self.rows: list[SteeringRow] = []
        self.applied_rows: list[RowState] = []
        self._applied_snapshot: tuple[Any, ...] = ((), "absolute")
        self._before_clear: tuple[list[SteeringRow], list[RowState], SteeringSpec, tuple[Any, ...]] | None = None
        self.rows_box = w.VBox(layout={"width": "100%"})
        self.unit = w.ToggleButtons(
            options=[(label, key) for key, label in UNITS.items()],
            value="absolute",
            tooltip="what a typed scale means",
            style={"button_width": "auto"},
        )
        self.state_label = w.HTML()
        self.spec_text = w.HTML(describe_rows([]))
        self.status = StatusLine()
        self.path = w.Text(value=str(library.root.parent / "steering.safetensors"), layout={"width": "auto"})
        self.last_future: Any = None
        self.apply_button = w.Button(description="Apply", button_style="primary", icon="check")
        self.undo_button = w.Button(description="Undo clear", icon="undo", disabled=True)
        buttons = {
            "Add row": ("plus", lambda: self.add_row(RowState(layer=min(4, engine.model.layer_count - 1)))),
            "Clear": ("eraser", self.clear),
            "Save": ("save", self.save),
            "Load": ("folder-open", self.load),
            "↻ vectors": ("", self.refresh_library),
        }
        made = {}
        for label, (icon, action) in buttons.items():
            made[label] = button = w.Button(description=label, icon=icon, layout={"width": "auto"})
            button.on_click(lambda _, act=action: act())
        made["↻ vectors"].tooltip = "reload the list of saved vectors"
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo_clear())
        self.unit.observe(self._unit_changed, names="value")
        self.widget = w.VBox(
            [
                w.HTML("<b>Steering</b>"),
                w.HBox([w.Label("scale in"), self.unit], layout={"flex_flow": "row wrap"}),
                self.rows_box,
                w.HBox(
                    [made["Add row"], self.apply_button, made["Clear"], self.undo_button, self.state_label],
                    layout={"flex_flow": "row wrap", "align_items": "center"},
                ),
                w.HBox([self.path, made["Save"], made["Load"], made["↻ vectors"]], layout={"flex_flow": "row wrap"}),
                self.spec_text,
                self.status.widget,
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-editor")
        self.changed()

    # -- units -------------------------------------------------------------

    def set_typical_norms(self, norms: TypicalNorms) -> None:
        self.typical = norms
        for row in self.rows:
            row.refresh()
        self.spec_text.value = describe_rows(self.applied_rows, norms)

    def _typical_at(self, layer: int) -> float | None:
        if self.typical is None or not 0 <= layer < len(self.typical.medians):
            return None
        return self.typical.at(layer)

    def to_absolute(self, value: float | None, layer: int, unit: str | None = None) -> float | None:
        """A value typed in ``unit`` (default: the editor's) in residual-stream units."""
        if value is None or (unit or self.unit.value) == "absolute":
            return value
        typical = self._typical_at(layer)
        if typical is None:
            raise SpecError(
                f"the typical norm of layer {layer} is not known yet (measuring, or the layer is out of range); "
                "type scales in absolute units meanwhile"
            )
        return value * typical

    def from_absolute(self, value: float | None, layer: int) -> float | None:
        if value is None or self.unit.value == "absolute":
            return value
        typical = self._typical_at(layer)
        return value / typical if typical is not None else value

    def _unit_changed(self, change: dict[str, Any]) -> None:
        """Convert every row's typed numbers to the new unit (rows that do not parse stay as typed)."""

        def old_unit(value: float | None, layer: int) -> float | None:
            return self.to_absolute(value, layer, change["old"])

        states = {}
        for row in self.rows:
            try:
                states[row] = row.state(old_unit)
            except SpecError:
                continue
        applied_unchanged = (self._snapshot()[0], change["old"]) == self._applied_snapshot
        for row, state in states.items():
            row.show(state, self.from_absolute)
            row.refresh()
        if applied_unchanged:
            self._applied_snapshot = self._snapshot()
        self.changed()

    def slider_range(self, op: str, layer: int) -> tuple[float, float]:
        """A slider range that suits the op, the unit and the layer's typical norm."""
        if op == "ablation":
            return -1.0, 2.0
        if self.unit.value == "typical":
            return -10.0, 10.0
        typical = self._typical_at(layer)
        reach = max(100.0, 4 * typical) if typical is not None else 100.0
        return -reach, reach

    def norm_text(self, vector: str, seed: int) -> str:
        """The norm of a row's vector as saved (a random draw's is not shown: it is only a direction)."""
        if vector == RANDOM:
            return "<span style='color:#555'>unit direction</span>"
        try:
            saved = raw_vector(RowState(0, vector=vector), self.engine.model.hidden_size, self.library)
        except SpecError as error:
            return f"<span style='color:#b00020'>{html.escape(str(error))}</span>"
        return f"<span style='color:#555'>‖v‖ = {float(saved.norm()):.4g}, used as a unit direction</span>"

    def units_text(self, row: SteeringRow) -> str:
        """Each typed value in the other unit, with the layer's typical norm."""
        layer = row.layer.value
        typical = self._typical_at(layer)
        if typical is None:
            known = self.typical is not None
            reason = f"layer {layer} is out of range" if known else "typical norm: measuring..."
            return f"<span style='color:#555'>{html.escape(reason)}</span>"
        if row.op.value == "ablation":
            return f"<span style='color:#555'>typical norm at layer {layer}: {typical:.4g}</span>"
        entries = (row.scale,) if row.op.value == "add" else (row.cap_min, row.cap_max)
        parts = []
        for entry in entries:
            try:
                value = entry.value("value")
            except SpecError:
                parts.append("?")
                continue
            if value is None:
                parts.append("open")
            elif self.unit.value == "absolute":
                parts.append(f"{value / typical:.3g}× typical")
            else:
                parts.append(f"{value * typical:.4g} absolute")
        return f"<span style='color:#555'>= {' to '.join(parts)} (typical norm at layer {layer}: {typical:.4g})</span>"

    # -- rows --------------------------------------------------------------

    def add_row(self, state: RowState) -> SteeringRow:
        row = SteeringRow(self, state)
        if self.unit.value != "absolute":
            row.show(state, self.from_absolute)
        self.rows.append(row)
        self._show_rows()
        return row

    def remove_row(self, row: SteeringRow) -> None:
        self.rows.remove(row)
        self._show_rows()

    def _show_rows(self) -> None:
        self.rows_box.children = [r.box for r in self.rows]
        self.changed()

    def refresh_library(self) -> None:
        """Offer the library's current vectors in every row."""
        names = self.library.names()
        for row in self.rows:
            row.set_vector_options(names)
            row.refresh()

    def _snapshot(self) -> tuple[Any, ...]:
        return (tuple(row.snapshot() for row in self.rows), self.unit.value)

    def changed(self) -> None:
        """Show whether the rows differ from what was last applied."""
        if self._snapshot() == self._applied_snapshot:
            self.state_label.value = "<span style='color:#2e7d32'>applied</span>" if self.rows else ""
            self.apply_button.button_style = "primary"
        else:
            self.state_label.value = f"<span style='color:{WARNING_COLOUR}'><b>modified, not applied</b></span>"
            self.apply_button.button_style = "warning"
        for row in self.rows:
            row.units.value = self.units_text(row)

    def row_states(self) -> list[RowState]:
        """The rows' values in residual-stream units (``SpecError`` naming the first bad one)."""
        return [row.state(self.to_absolute) for row in self.rows]

    def current_spec(self) -> SteeringSpec:
        model = self.engine.model
        return rows_to_spec(self.row_states(), model.hidden_size, self.library, model.layer_count)

    # -- actions -------------------------------------------------------------

    def apply(self) -> Any:
        """Build the spec from the rows and apply it atomically; on bad input,
        apply nothing and say why. Returns the bridge future (or ``None``)."""
        try:
            states = self.row_states()
            model = self.engine.model
            spec = rows_to_spec(states, model.hidden_size, self.library, model.layer_count)
            spec.validate_for(model.hidden_size, model.layer_count, model.dtype)
        except Exception as error:  # shown to the user, not lost; nothing is applied
            self.status.report(error)
            return None
        return self._apply(spec, states, self._snapshot())

    def _apply(self, spec: SteeringSpec, states: list[RowState], snapshot: tuple[Any, ...]) -> Any:
        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:
                self.status.report(error)
                return
            self.applied_rows, self._applied_snapshot = states, snapshot
            self.spec_text.value = describe_rows(states, self.typical)
            self.status.show("")
            self.changed()

        self.undo_button.disabled = True
        self.last_future = self.engine.submit(self.engine.model.apply_steering_spec(spec), done)
        return self.last_future

    def clear(self) -> Any:
        """Remove every row and apply no steering; ``undo_clear`` brings them back once."""
        model = self.engine.model
        self._before_clear = (self.rows, self.applied_rows, model.export_steering_spec(), self._applied_snapshot)
        self.rows = []
        self._show_rows()
        future = self._apply(SteeringSpec(), [], self._snapshot())
        self.undo_button.disabled = False
        return future

    def undo_clear(self) -> Any:
        """Put back the rows removed by the last Clear and the steering applied before it."""
        if self._before_clear is None:
            return None
        rows, applied, spec, snapshot = self._before_clear
        self._before_clear = None
        self.rows = rows
        self.rows_box.children = [r.box for r in rows]
        return self._apply(spec, applied, snapshot)

    def save(self) -> None:
        try:
            self.current_spec().save(self.path.value)
            self.status.report(None, f"saved to {self.path.value}")
        except Exception as error:
            self.status.report(error)

    def load(self) -> Any:
        """Load a spec file into editor rows (its vectors go into the library) and apply it."""
        try:
            spec = SteeringSpec.load(self.path.value)
            spec.validate_for(self.engine.model.hidden_size, self.engine.model.layer_count)
        except Exception as error:
            self.status.report(error)
            return None
        return self.show_spec(spec, Path(self.path.value).stem)

    def show_spec(self, spec: SteeringSpec, name: str) -> Any:
        """Replace the rows by ones that rebuild ``spec`` and apply it."""
        states = rows_from_spec(spec, self.library, name)
        self.rows = []
        for state in states:
            self.add_row(state)
        self.refresh_library()
        return self.apply()
