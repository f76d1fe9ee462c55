"""Figures and sessions on disk: what a researcher takes away from the workbench.

``export_figure`` writes a plotly figure as standalone HTML (plotly.js
embedded, opens offline) and as PNG / SVG through kaleido, which drives a
Chromium; the system's Debian ``chromium`` is used when ``BROWSER_PATH`` is
not set. ``export_figures`` writes many with one browser (starting one per
image costs seconds each) and reports progress. ``save_session`` /
``load_session`` keep one workbench session in a folder: the steering spec
(safetensors), the conversation and sampling settings (JSON) and every
figure (plotly's figure JSON, which plotly.js and ``plotly.io.read_json``
read). Nothing here executes code on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from workbench.errors import SessionError
from workbench.files import atomic_write_text
from workbench.specs import SteeringSpec

FIGURE_FORMATS = ("html", "png", "svg")
SYSTEM_CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _browser_for_kaleido() -> None:
    """Point kaleido at the system Chromium unless the user chose one."""
    if "BROWSER_PATH" not in os.environ:
        found = next((path for name in SYSTEM_CHROMIUM if (path := shutil.which(name))), None)
        if found:
            os.environ["BROWSER_PATH"] = found


def export_figure(figure: go.Figure, stem: str | Path, formats: Iterable[str] = FIGURE_FORMATS) -> list[Path]:
    """Write ``figure`` to ``<stem>.<format>`` for each format; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    figure = go.Figure(figure)  # a FigureWidget exports like a figure
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt == "html":
            figure.write_html(path, include_plotlyjs=True, full_html=True)
        elif fmt in ("png", "svg"):
            _browser_for_kaleido()
            figure.write_image(path, format=fmt, scale=2 if fmt == "png" else 1)
        else:
            raise SessionError(f"unknown figure format {fmt!r}; use one of {FIGURE_FORMATS}")
        paths.append(path)
    return paths


@contextlib.contextmanager
def _one_browser() -> Iterator[None]:
    """Kaleido renders every image of the block in one Chromium."""
    import kaleido

    _browser_for_kaleido()
    kaleido.start_sync_server(silence_warnings=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def export_figures(
    figures: Mapping[str, go.Figure],
    folder: str | Path,
    formats: Iterable[str] = FIGURE_FORMATS,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Every figure to ``folder/<name>.<format>``; ``progress(done, total)``
    after each figure. Safe to run off the kernel's thread on copies of the
    figures (``go.Figure(widget)``)."""
    formats = tuple(formats)
    paths: list[Path] = []
    images = any(fmt in ("png", "svg") for fmt in formats)
    with _one_browser() if images else contextlib.nullcontext():
        for done, (name, figure) in enumerate(figures.items(), start=1):
            paths += export_figure(figure, Path(folder) / name, formats)
            if progress is not None:
                progress(done, len(figures))
    return paths


@dataclass
class Session:
    """One workbench session as data."""

    spec: SteeringSpec = field(default_factory=SteeringSpec)
    settings: dict[str, Any] = field(default_factory=dict)
    """System prompt, prefill, sampling controls, and the conversation (each branch's history and the turns)."""
    figures: dict[str, go.Figure] = field(default_factory=dict)


def save_session(folder: str | Path, session: Session, figure_formats: Iterable[str] = ()) -> Path:
    """Write ``session`` into ``folder`` (created); figures also exported in ``figure_formats``."""
    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    session.spec.save(folder / "spec.safetensors")
    atomic_write_text(folder / "session.json", json.dumps({"settings": session.settings}, indent=2))
    for name, figure in session.figures.items():
        atomic_write_text(folder / "figures" / f"{name}.json", pio.to_json(go.Figure(figure)))
    if figure_formats:
        export_figures(session.figures, folder / "figures", figure_formats)
    return folder


def load_session(folder: str | Path) -> Session:
    """Read a folder written by ``save_session``."""
    folder = Path(folder)
    try:
        meta: Mapping[str, Any] = json.loads((folder / "session.json").read_text())
    except FileNotFoundError:
        raise SessionError(f"{folder} is not a workbench session (no session.json)") from None
    except json.JSONDecodeError as error:
        raise SessionError(f"{folder / 'session.json'} is not valid JSON: {error}") from None
    figures = {
        path.stem: go.Figure(json.loads(path.read_text())) for path in sorted((folder / "figures").glob("*.json"))
    }
    return Session(
        spec=SteeringSpec.load(folder / "spec.safetensors"),
        settings=dict(meta.get("settings", {})),
        figures=figures,
    )
