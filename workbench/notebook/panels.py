"""``Workbench``: the panels composed, with an engine line, the typical
residual norms, and a session bar that saves / reloads the session and
exports the figures (off the kernel's thread, with a progress bar).

Panels talk to the engine only through the bridge (``NotebookEngine.submit``),
so no callback blocks the kernel while the model generates; each panel's
errors appear in its status line.
"""

from __future__ import annotations

import concurrent.futures
import html
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.notebook.activations import ActivationsPanel
from workbench.notebook.chat_panel import ChatPanel
from workbench.notebook.contrast_panel import ContrastPanel
from workbench.notebook.conversation import STEERED
from workbench.notebook.editor import SteeringPanel
from workbench.notebook.engine import NotebookEngine
from workbench.notebook.home import exports_dir, sessions_dir, vectors_dir
from workbench.notebook.lens_panel import LensPanel
from workbench.notebook.residual_norms import TypicalNorms, typical_norms
from workbench.notebook.session import (
    FIGURE_FORMATS,
    Session,
    export_figures,
    load_session,
    save_session,
)
from workbench.notebook.sweep_panel import SweepPanel
from workbench.notebook.widgets import StatusLine, replace_figure
from workbench.vector_library import VectorLibrary

LOG_LINES = 60
"""Engine log lines the workbench shows on request."""

STYLE = """<style>
.wb-spec, .wb-sweep {border-collapse: collapse; font-size: 12px; width: 100%}
.wb-spec td, .wb-spec th, .wb-sweep td, .wb-sweep th {border-bottom: 1px solid #ddd; padding: 2px 6px;
  text-align: left; vertical-align: top; overflow-wrap: break-word}
.wb-sweep td {overflow-wrap: anywhere}
.wb-branch-title {border-bottom: 1px solid #ccc; margin-bottom: 4px}
.wb-lens {border-collapse: collapse; font-size: 12px; width: 100%}
.wb-lens td, .wb-lens th {border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere}
.wb-lens-note {font-weight: normal; color: #555}
.wb-root .widget-inline-hbox {max-width: calc(100% - 2 * var(--jp-widgets-margin, 2px))}
.wb-root .js-plotly-plot {width: 100%; min-width: 0}
.wb-log {max-height: 300px; overflow: auto; font-size: 11px; background: #f7f7f7; padding: 4px}
</style>"""


class Workbench:
    """Steering editor, chat and activation plots for one engine.

    Example::

        from workbench.notebook import get_engine, Workbench
        bench = Workbench(get_engine())
        bench  # displays the panels
    """

    def __init__(
        self, engine: NotebookEngine, plot_layer: int | None = None, library_dir: str | Path | None = None
    ) -> None:
        model = engine.model
        layer = plot_layer if plot_layer is not None else model.layer_count // 2
        self.engine = engine
        self.library = VectorLibrary(library_dir if library_dir is not None else vectors_dir())
        self.steering = SteeringPanel(engine, self.library)
        self.chat = ChatPanel(engine)
        self.activations = ActivationsPanel(model.tokenizer, model.layer_count, layer)
        self.activations.direction_names = lambda: {(r.layer, r.op): r.name() for r in self.steering.applied_rows}
        self.lens = LensPanel(engine)
        self.activations.on_token_click.append(self.lens.select)
        self.sweep = SweepPanel(engine, self.library, lambda: (self.chat.system.value, self.chat.history(STEERED)))
        self.contrast = ContrastPanel(engine, self.library, self._library_changed)
        self.chat.on_turn += [self.activations.show, self.lens.show, lambda _: self.sweep.refresh_context()]
        self.chat.on_reset.append(self.sweep.refresh_context)
        self.chat.system.observe(lambda _: self.sweep.refresh_context(), names="value")

        self.norms_line = w.HTML("typical residual norms: measuring...")
        remeasure = w.Button(description="Re-measure", icon="refresh", layout={"width": "auto"})
        remeasure.tooltip = "measure each layer's typical residual norm again (median token norm, no steering)"
        remeasure.on_click(lambda _: self.measure_norms(refresh=True))
        self.engine_line = w.HTML(self._engine_text())
        self.log_view = w.HTML(layout={"display": "none", "width": "100%"})
        show_log = w.ToggleButton(description="engine log", icon="file-text", layout={"width": "auto"})
        show_log.observe(lambda change: self._show_log(change["new"]), names="value")

        self.folder = w.Text(value=str(sessions_dir() / "session"), description="folder", layout={"flex": "1 1 300px"})
        self.export_progress = w.IntProgress(value=0, min=0, max=1, layout={"width": "120px", "display": "none"})
        self.status = StatusLine()
        self._exporter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-export")
        self.export_future: concurrent.futures.Future[list[Path]] | None = None
        self.export_button = w.Button(description="Export figures", icon="image", layout={"width": "auto"})
        self.export_button.tooltip = f"HTML, PNG and SVG of every plot, into {exports_dir()}/<folder name>"
        self.export_button.on_click(lambda _: self.export_figures_in_background())
        save = w.Button(description="Save session", icon="save", layout={"width": "auto"})
        load = w.Button(description="Load session", icon="folder-open", layout={"width": "auto"})
        save.on_click(lambda _: self._safely("saved the session to", self.save_session))
        load.on_click(lambda _: self._safely("loaded the session from", self.load_session))

        wrap = {"flex_flow": "row wrap", "align_items": "center", "width": "100%"}
        self.widget = w.VBox(
            [
                w.HTML(STYLE),
                w.HBox([self.engine_line, show_log, self.norms_line, remeasure], layout=wrap),
                self.log_view,
                w.GridBox(
                    [self.chat.widget, self.steering.widget],
                    layout={"grid_template_columns": "minmax(0, 11fr) minmax(0, 9fr)", "grid_gap": "16px"},
                ),
                w.HBox([self.folder, save, load, self.export_button, self.export_progress], layout=wrap),
                self.status.widget,
                self.activations.widget,
                self.lens.widget,
                w.Accordion([self.sweep.widget, self.contrast.widget], titles=("Sweep", "Direction from captures")),
            ],
            layout={"width": "100%"},
        )
        self.widget.add_class("wb-root")
        self.norms_future = self.measure_norms()

    # -- engine line and typical norms --------------------------------------

    def _engine_text(self) -> str:
        model, log = self.engine.model, self.engine.config.log_file
        where = f"; log file <code>{html.escape(str(log))}</code>" if log else ""
        return (
            f"<span style='color:#555'>engine: {html.escape(Path(model.model_name).name)}, "
            f"{str(model.dtype).removeprefix('torch.')}, {model.layer_count} layers{where}</span>"
        )

    def _show_log(self, shown: bool) -> None:
        lines = self.engine.model.engine_log_tail()[-LOG_LINES:] if shown else []
        text = html.escape("\n".join(lines)) or "(the engine has printed nothing)"
        self.log_view.value = f"<pre class='wb-log'>{text}</pre>" if shown else ""
        self.log_view.layout.display = "" if shown else "none"

    def measure_norms(self, refresh: bool = False) -> Any:
        """Load (or measure) the typical residual norms and give them to the editor and the sweep."""
        self.norms_line.value = "typical residual norms: measuring..."

        def done(norms: TypicalNorms | None, error: BaseException | None) -> None:
            if error is not None or norms is None:
                self.norms_line.value = f"<span style='color:#b00020'>typical norms: {html.escape(str(error))}</span>"
                return
            self.steering.set_typical_norms(norms)
            self.sweep.typical = norms
            self.norms_line.value = (
                f"<span style='color:#555'>typical residual norms: median token norm per layer over "
                f"{norms.tokens} tokens, no steering, measured {html.escape(norms.measured)}</span>"
            )

        self.norms_future = self.engine.submit(typical_norms(self.engine.model, refresh=refresh), done)
        return self.norms_future

    def _library_changed(self) -> None:
        self.steering.refresh_library()
        self.sweep.refresh_library()

    # -- session bar ----------------------------------------------------------

    def _safely(self, verb: str, action: Any) -> None:
        try:
            action(self.folder.value)
            self.status.report(None, f"{verb} {self.folder.value}")
        except Exception as error:
            self.status.report(error)

    def figures(self) -> dict[str, go.FigureWidget]:
        """Every plot of the workbench by name."""
        return {**self.activations.figures(), "sweep": self.sweep.figure}

    def session(self) -> Session:
        return Session(
            spec=self.engine.model.export_steering_spec(),
            settings=self.chat.settings(),
            figures=dict(self.figures()),
        )

    def save_session(self, folder: str | Path, figure_formats: tuple[str, ...] = ()) -> Path:
        """Spec, conversation, controls and figure data into ``folder`` (reload with ``load_session``)."""
        return save_session(folder, self.session(), figure_formats)

    def load_session(self, folder: str | Path) -> Any:
        """Restore a saved session: editor rows and the applied spec, chat, controls, figures."""
        saved = load_session(folder)
        self.chat.restore(saved.settings)
        for name, widget in self.figures().items():
            if name in saved.figures:
                replace_figure(widget, saved.figures[name])
        return self.steering.show_spec(saved.spec, f"{Path(folder).name}-spec")

    def export_folder(self) -> Path:
        """Where Export figures writes: the exports folder, under the session folder's name."""
        return exports_dir() / (Path(self.folder.value).name or "figures")

    def export_figures(self, folder: str | Path, formats: tuple[str, ...] = FIGURE_FORMATS) -> list[Path]:
        """Every plot as standalone HTML, PNG and SVG under ``folder`` (blocks; see the background variant)."""
        return export_figures({name: go.Figure(fig) for name, fig in self.figures().items()}, folder, formats)

    def export_figures_in_background(
        self, folder: str | Path | None = None, formats: tuple[str, ...] = FIGURE_FORMATS
    ) -> concurrent.futures.Future[list[Path]] | None:
        """Export every plot off the kernel's thread, with the progress bar;
        ``None`` while an export is still running."""
        if self.export_future is not None and not self.export_future.done():
            return None
        target = Path(folder) if folder is not None else self.export_folder()
        copies = {name: go.Figure(fig) for name, fig in self.figures().items()}  # taken on the kernel's thread
        self.export_progress.value, self.export_progress.max = 0, len(copies)
        self.export_progress.layout.display = ""
        self.export_button.disabled = True
        self.status.show(f"exporting {len(copies)} figures to {target} ...")

        def progress(done: int, total: int) -> None:
            self.export_progress.value = done

        def finished(future: concurrent.futures.Future[list[Path]]) -> None:
            self.export_button.disabled = False
            self.export_progress.layout.display = "none"
            error = future.exception()
            self.status.report(
                error,
                f"exported {len(copies)} figures ({len(future.result()) if error is None else 0} files) to {target}",
            )

        self.export_future = self._exporter.submit(export_figures, copies, target, formats, progress)
        self.export_future.add_done_callback(finished)
        return self.export_future

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
