"""``PlotWidget``: a plotly ``FigureWidget`` whose code reaches the page once,
and which takes its column's width.

plotly (>= 6) draws ``FigureWidget``s through anywidget, with its whole
widget bundle (plotly.js, ~5 MB) as every figure's ``_esm``. Each figure's
state then carries the bundle and the page compiles it once per figure (about
a second each on a 2-core machine). A page reload restores all widget states
at once: six figures meant a 30 MB state message and seconds of compiling on
the page's one thread, past two 2-second limits there (anywidget's "Failed to
initialize model", after which a figure drops the kernel's updates, and the
widget manager's wait for a model, "widget model not found", which loses the
whole workbench).

Here the bundle travels once per kernel, in one ``PlotlyBundle`` widget; the
page compiles it once and every ``PlotWidget``'s small module waits for it,
then hands over to plotly's own widget code (its anywidget interface, so the
traits, messages and click callbacks are plotly's). The small module also
fits the figure to its element's width whenever the element changes size and
after each edit from the kernel: plotly's widget code sizes a figure only
when it is drawn (before anywidget attaches it, so at plotly's default
700 px) and listens to no resize under anywidget, and plotly.js fixes the
width at the drawn one whenever an edit sets the height. A width the figure
itself gives is kept.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import anywidget
import plotly
import plotly.graph_objects as go
import traitlets

_SHARED = """
function shared(key) {
  const all = (globalThis[Symbol.for("workbench.plotly-bundles")] ??= new Map());
  if (!all.has(key)) {
    const entry = { loading: false };
    entry.promise = new Promise((resolve, reject) => Object.assign(entry, { resolve, reject }));
    all.set(key, entry);
  }
  return all.get(key);
}
"""
"""The page-wide table of loaded bundles, keyed by plotly version and content."""

_BUNDLE_ESM = (
    _SHARED
    + """
export default {
  initialize({ model }) {
    const entry = shared(model.get("key"));
    if (entry.loading) return;
    entry.loading = true;
    const url = URL.createObjectURL(new Blob([model.get("bundle")], { type: "text/javascript" }));
    // plotly.js sets globalThis.Plotly while the bundle is evaluated: keep that instance.
    import(url)
      .then((module) => entry.resolve({ module, plotly: globalThis.Plotly }), entry.reject)
      .finally(() => URL.revokeObjectURL(url));
  },
};
"""
)
"""Compiles the bundle once per page; does not wait for it (nothing here needs the kernel's messages)."""

_FIGURE_ESM = (
    _SHARED
    + """
const KEY = %s;
const WAIT_MS = 1500;

export default () => {
  let loaded;
  return {
    initialize(context) {
      loaded = shared(KEY).promise.then(async ({ module, plotly }) => {
        const figure = await module.default();
        await figure.initialize?.(context);
        return { figure, plotly };
      });
      // anywidget gives initialize 2 s and then ignores the kernel's messages to this model for
      // good; the views wait for the bundle in any case.
      return Promise.race([loaded, new Promise((resolve) => setTimeout(resolve, WAIT_MS))]);
    },
    async render(context) {
      const { figure, plotly } = await loaded;
      const { el } = context;
      const cleanup = await figure.render(context);
      let timer;
      const fit = () => {
        // Flagged as plotly's widget code flags the kernel's own edits, so the drawn width is
        // not reported back to the kernel as the figure's width.
        if (!el._fullLayout || !el.offsetParent || context.model.get("_widget_layout")?.width) return;
        plotly.relayout(el, { width: null, _doNotReportToPy: true }).catch(() => {});
      };
      const refit = () => {
        clearTimeout(timer);
        timer = setTimeout(fit, 100);
      };
      const observer = new ResizeObserver(refit);
      observer.observe(el);
      const edits = ["change:_py2js_relayout", "change:_py2js_update"];
      for (const edit of edits) context.model.on(edit, refit);
      return () => {
        observer.disconnect();
        for (const edit of edits) context.model.off(edit, refit);
        clearTimeout(timer);
        if (typeof cleanup === "function") cleanup();
      };
    },
  };
};
"""
)
"""Each figure: plotly's widget code from the shared bundle, fitted to its element's width.

``initialize`` waits for the bundle (so plotly's model code sees the kernel's
first messages) but returns before anywidget's limit: past it, anywidget
would drop every later message to the figure."""


def _bundle_text() -> str:
    return str(go.FigureWidget._esm)


BUNDLE_KEY = f"plotly-{plotly.__version__}-{hashlib.sha256(_bundle_text().encode()).hexdigest()[:16]}"
"""Names this plotly's bundle on the page (two kernels with one plotly share it)."""


class PlotlyBundle(anywidget.AnyWidget):
    """plotly's widget bundle, sent to the page once for all ``PlotWidget``s of a kernel."""

    _esm = _BUNDLE_ESM
    key = traitlets.Unicode(BUNDLE_KEY).tag(sync=True)
    bundle = traitlets.Unicode().tag(sync=True)


_bundle: PlotlyBundle | None = None


def plotly_bundle() -> PlotlyBundle:
    """The kernel's ``PlotlyBundle`` (created, and so sent to the page, on first use)."""
    global _bundle
    if _bundle is None or _bundle.comm is None:
        _bundle = PlotlyBundle(bundle=_bundle_text())
    return _bundle


class PlotWidget(go.FigureWidget):
    """A ``FigureWidget`` (same API, traits and callbacks) that loads plotly's
    code from the kernel's shared ``PlotlyBundle`` and follows its element's width.

    Example::

        widget = PlotWidget(go.Figure(go.Scatter(y=[1, 3, 2])))
        widget  # displays it
    """

    _esm = _FIGURE_ESM % json.dumps(BUNDLE_KEY)

    def __init__(self, data: Any = None, **kwargs: Any) -> None:
        plotly_bundle()  # on the page before the first figure that waits for it
        super().__init__(data, **kwargs)
