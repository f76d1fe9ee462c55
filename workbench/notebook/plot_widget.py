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
const EDITS = %s;

// plotly's model code, told of an edit, reads it with model.get(name). A kept edit is replayed
// through a view of the model that shows it as current, to plotly's own listeners only.
function replayable(model) {
  const shown = new Map();
  const listeners = [];
  let recording = true;
  const seen = new Proxy(model, {
    get(target, prop) {
      if (prop === "get") return (name) => (shown.has(name) ? shown.get(name) : target.get(name));
      if (prop === "on")
        return (event, listener) => {
          if (recording) listeners.push([event, listener]);
          target.on(event, listener);
        };
      const value = Reflect.get(target, prop);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  const replay = (edits) => {
    recording = false;
    for (const [name, value] of edits) {
      shown.set(name, value);
      for (const [event, listener] of listeners) if (event === `change:${name}`) listener(seen, value);
      shown.delete(name);
    }
  };
  return { seen, replay };
}

export default () => {
  let loaded;
  return {
    initialize(context) {
      const { model } = context;
      // Edits that arrive before plotly's code are kept for its model code, which keeps the
      // figure that views draw. A whole figure from the kernel already holds the edits before it.
      const early = [];
      const keep = (name) => () => model.get(name) !== null && early.push([name, model.get(name)]);
      const listening = [
        ...EDITS.map((name) => [`change:${name}`, keep(name)]),
        ...["change:_widget_data", "change:_widget_layout"].map((event) => [event, () => (early.length = 0)]),
      ];
      for (const [event, listener] of listening) model.on(event, listener);
      loaded = shared(KEY).promise.then(async ({ module, plotly }) => {
        const figure = await module.default();
        const { seen, replay } = replayable(model);
        await figure.initialize?.({ ...context, model: seen });
        for (const [event, listener] of listening) model.off(event, listener);
        replay(early);
        return { figure, plotly };
      });
      // Returns at once: anywidget drops every later message to a model whose initialize has not
      // returned 2 s after the model was made, and a busy page can take longer to load plotly.
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

``initialize`` returns before the bundle is loaded (anywidget's 2-second
limit) and keeps the kernel's edits that arrive meanwhile (``EDITS``, plotly's
``_py2js_*`` messages) for plotly's model code, which sees them once loaded."""

_EDITS = sorted(name for name in go.FigureWidget.class_trait_names() if name.startswith("_py2js_"))
"""The traits through which plotly's ``FigureWidget`` sends the kernel's edits to the page."""


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

    _esm = _FIGURE_ESM % (json.dumps(BUNDLE_KEY), json.dumps(_EDITS))

    def __init__(self, data: Any = None, **kwargs: Any) -> None:
        plotly_bundle()  # on the page before the first figure that waits for it
        super().__init__(data, **kwargs)
