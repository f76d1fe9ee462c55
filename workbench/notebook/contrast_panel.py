"""A direction from the difference of captured means of two prompt sets,
saved into the vector library for the editor and the sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as w

from workbench.notebook.engine import NotebookEngine
from workbench.notebook.widgets import StatusLine
from workbench.vector_library import VectorLibrary


class ContrastPanel:
    """Positive minus negative mean activation at one layer, saved by name."""

    def __init__(self, engine: NotebookEngine, library: VectorLibrary, on_saved: Callable[[], None]) -> None:
        self.engine = engine
        self.library = library
        self.on_saved = on_saved
        model = engine.model
        box = {"width": "auto", "flex": "1 1 240px"}
        self.positive = w.Textarea(placeholder="one example per line", description="positive", layout=box)
        self.negative = w.Textarea(placeholder="one example per line", description="negative", layout=box)
        self.layer = w.Dropdown(
            options=list(range(model.layer_count)), value=model.layer_count // 2, description="layer"
        )
        self.tokens = w.Dropdown(options=["last_prompt", "prompt_mean"], value="last_prompt", description="tokens")
        self.name = w.Text(value="contrast", description="save as")
        self.status = StatusLine()
        self.last_future: Any = None
        make = w.Button(description="Make vector", icon="magic")
        make.on_click(lambda _: self.make())
        row = {"flex_flow": "row wrap", "width": "100%"}
        self.widget = w.VBox(
            [
                w.HTML("<b>Direction from captured means</b> (positive minus negative)"),
                w.HBox([self.positive, self.negative], layout=row),
                w.HBox([self.layer, self.tokens, self.name, make], layout=row),
                self.status.widget,
            ],
            layout={"width": "100%"},
        )

    def make(self) -> Any:
        from workbench.contrast import extract_contrast_vectors

        positive = [line for line in self.positive.value.splitlines() if line.strip()]
        negative = [line for line in self.negative.value.splitlines() if line.strip()]
        layer, name, tokens = self.layer.value, self.name.value, self.tokens.value

        async def extract() -> Any:
            vectors = await extract_contrast_vectors(self.engine.model, positive, negative, [layer], tokens=tokens)
            return self.library.save(name, vectors[layer])

        def done(_: Any, error: BaseException | None) -> None:
            self.status.report(error, f"saved {name!r} (layer {layer}); pick it as a vector in the editor or the sweep")
            if error is None:
                self.on_saved()

        self.last_future = self.engine.submit(extract(), done)
        return self.last_future
