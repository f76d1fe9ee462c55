"""The workbench in a real JupyterLab, driven by headless Chromium (Playwright).

One JupyterLab and one kernel (one engine) serve every test here: the
``workbench`` fixture opens a copy of notebooks/02_workbench.ipynb, runs all
cells and waits for the notebook's scripted turn. The tests then drive the
page as a user would, in file order (each leaves the page usable for the
next): three compare turns, the heatmap's hover, a click into the logit
lens, a bad layer, Stop, the layout at 1280 and 1600 px, a sweep, and a page
reload with a turn after it. A last test opens a small notebook of its own in
a second tab (its own kernel, no engine). Screenshots go next to the copied
notebook (and under $WORKBENCH_ARTIFACTS if set).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("BROWSER_PATH", "/usr/bin/chromium"))
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "02_workbench.ipynb"
TURN_S = 120_000
"""Milliseconds a chat turn may take in the browser."""

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; `make test` installs it (apt-get install chromium)")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    # JupyterLab only renders cells near the viewport by default; render them all.
    settings = tmp_path_factory.mktemp("settings") / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = settings.parent / "apputils-extension"
    news.mkdir()
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = free_port(), "workbench-test"
    env = {**os.environ, "WORKBENCH_HOME": str(root / "home")}  # the kernel (and its engine) inherit it
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.extension_manager=readonly",
            f"--LabApp.user_settings_dir={settings.parent.parent}",
            f"--LabApp.workspaces_dir={tmp_path_factory.mktemp('workspaces')}",  # no tabs left open by other labs
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("JupyterLab did not start: " + (root / "server.log").read_text()[-2000:])
    yield url, token, root
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(lab, browser):
    """The notebook run top to bottom in Chromium, its scripted turn done."""
    from playwright.sync_api import expect

    url, token, root = lab
    tab = open_tab(browser, root, "console.log")
    try:
        open_notebook(tab, f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
        run_all(tab)
        # The user's message shows at once; the plots once the turn (48 tokens per branch) is done.
        expect(column(tab, "steered")).to_contain_text("Tell me a fact about cats.", timeout=300_000)
        expect(tab.locator(".legendtext", has_text="steered").first).to_be_visible(timeout=300_000)
        yield tab
        save_screenshot(tab, root / "workbench.png")
    except BaseException:
        save_screenshot(tab, root / "failure.png")
        raise
    finally:
        tab.close()


def open_tab(browser, root: Path, log: str):
    """A new tab whose console (and widget errors' causes) go to ``root / log``."""
    tab = browser.new_page(viewport={"width": 1600, "height": 1400})
    tab.root = root
    console = (root / log).open("w")
    tab.on("console", lambda message: console.write(f"{message.type}: {message.text}\n"))
    tab.on("pageerror", lambda error: console.write(f"page error: {error}\n"))
    tab.add_init_script(REPORT_CAUSES)
    return tab


def open_notebook(tab, url: str) -> None:
    """Open the notebook at ``url`` and wait for its kernel (Run All is ignored until it is up)."""
    from playwright.sync_api import expect

    tab.goto(url)
    tab.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    expect(tab.locator(".jp-StatusBar-TextItem", has_text="Idle").first).to_be_visible(timeout=120_000)


def run_all(tab) -> None:
    tab.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    tab.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


REPORT_CAUSES = """for (const kind of ['error', 'unhandledrejection']) window.addEventListener(kind, event => {
  const error = event.error || event.reason;
  if (error && error.cause) console.log(`${kind}: ${error} caused by ${error.cause}\\n${error.cause.stack || ''}`);
});"""
"""Widget errors wrap their cause (anywidget's "Failed to initialize model"): write it to console.log."""


def save_screenshot(page, path: Path, element=None) -> None:
    (element or page).screenshot(path=str(path), **({} if element else {"full_page": True}))
    if artifacts := os.environ.get("WORKBENCH_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


def column(page, label: str):
    """The chat transcript column of one branch."""
    return page.locator(f".wb-column-{label}").first


def button(page, text: str):
    return page.locator("button.widget-button", has_text=text).first


def plot_index(page, title: str) -> int:
    """Position of the plot whose title contains ``title`` among the page's plots."""
    index = page.evaluate(
        "(title) => Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".findIndex(p => (p.querySelector('.gtitle') || {}).textContent?.includes(title))",
        title,
    )
    assert index >= 0, title
    return index


def send(page, text: str, expect) -> None:
    page.fill("input[placeholder='Say something']", text)
    button(page, "Send").click()
    # The message shows at once, and Send stays disabled while the turn runs.
    expect(column(page, "steered")).to_contain_text(text, timeout=10_000)


def test_compare_branches_stay_independent_over_three_turns(page):
    from playwright.sync_api import expect

    for text in ("Why is that?", "Tell me another one."):
        send(page, text, expect)
        expect(button(page, "Send")).to_be_enabled(timeout=TURN_S)
    baseline, steered = column(page, "baseline").inner_text(), column(page, "steered").inner_text()
    assert baseline.count("you:") == steered.count("you:") == 3
    assert baseline.count("baseline:") == 3 and steered.count("steered:") == 3
    assert "steered:" not in baseline and "baseline:" not in steered
    replies = [line for line in steered.splitlines() if line.startswith("steered:")]
    assert [line for line in baseline.splitlines() if line.startswith("baseline:")] != replies
    save_screenshot(page, page.root / "chat.png", page.locator(".wb-chat").first)


def test_heatmap_hover_shows_the_token_text(page):
    index = plot_index(page, "per token and layer")
    plot = page.locator(".js-plotly-plot").nth(index)
    plot.scroll_into_view_if_needed()
    area = plot.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(area["x"] + area["width"] * 0.3, area["y"] + area["height"] * 0.5)
    hover = page.locator(".hoverlayer .hovertext").first
    hover.wait_for(timeout=10_000)
    text = hover.text_content()
    assert "token '" in text and "token -" not in text, text
    assert "layer" in text and "residual norm" in text
    save_screenshot(page, page.root / "heatmap-hover.png", plot)


def test_a_heatmap_click_reads_that_token_through_the_logit_lens(page):
    from playwright.sync_api import expect

    lens = page.locator(".wb-lens-panel").first
    expect(lens.locator("table.wb-lens")).to_be_visible(timeout=30_000)
    plot = page.locator(".js-plotly-plot").nth(plot_index(page, "per token and layer"))
    area = plot.locator(".nsewdrag").first.bounding_box()
    page.mouse.click(area["x"] + area["width"] * 0.98, area["y"] + area["height"] * 0.5)  # a reply token
    expect(lens).to_contain_text("reply ", timeout=30_000)
    expect(lens).to_contain_text("top 5 next tokens at 30 layers")
    assert lens.locator("table.wb-lens tbody tr").count() == 30
    save_screenshot(page, page.root / "lens.png", lens)


def test_a_bad_layer_shows_a_message_and_applies_nothing(page):
    from playwright.sync_api import expect

    spec = page.locator(".wb-spec").first.inner_text()
    layer = page.locator(".wb-editor .widget-text:has(label:text-is('layer')) input").first
    layer.fill("99")
    layer.press("Enter")
    expect(page.locator(".wb-editor", has_text="modified, not applied").first).to_be_visible(timeout=10_000)
    button(page, "Apply").click()
    expect(page.locator(".wb-editor", has_text="layer 99 is out of range").first).to_be_visible(timeout=10_000)
    assert page.locator(".wb-spec").first.inner_text() == spec
    assert layer.input_value() == "99"  # left as typed
    save_screenshot(page, page.root / "editor.png", page.locator(".wb-editor").first)
    layer.fill("4")
    layer.press("Enter")
    button(page, "Apply").click()
    expect(page.locator(".wb-editor", has_text="applied").first).to_be_visible(timeout=10_000)


def test_stop_aborts_a_long_generation_and_the_next_send_works(page):
    from playwright.sync_api import expect

    readout = page.locator(".wb-chat .widget-hslider:has(.widget-label:text-is('max tokens')) .widget-readout").first
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("512")
    page.keyboard.press("Enter")
    before = len(column(page, "steered").inner_text())
    send(page, "Write a long story about a dragon who bakes bread.", expect)
    page.wait_for_function(  # replies stream in: the column grows while the turn runs
        "(before) => document.querySelector('.wb-column-steered').innerText.length > before + 120",
        arg=before,
        timeout=60_000,
    )
    expect(button(page, "Send")).to_be_disabled()
    began = time.monotonic()
    button(page, "Stop").click()
    expect(button(page, "Send")).to_be_enabled(timeout=2_000)
    assert time.monotonic() - began < 2.0
    expect(column(page, "steered")).to_contain_text("stopped; not part of the conversation")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("8")
    page.keyboard.press("Enter")
    send(page, "Name a colour.", expect)
    expect(button(page, "Send")).to_be_enabled(timeout=TURN_S)
    assert column(page, "steered").inner_text().count("steered:") == 5


def all_plot_data(page) -> list:
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".map(p => [p.querySelector('.gtitle')?.textContent,"
        " ...(p.data || []).map(t => JSON.stringify([t.name, t.x && Array.from(t.x).length, t.z && t.z.length]))])"
    )


def wait_for_plot_data(page) -> None:
    """Wait until every plot has traces; name the plots that never got any."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.js-plotly-plot')).every(p => p.data && p.data.length)",
            timeout=30_000,
        )
    except PlaywrightTimeout:
        titles = [title for title, *traces in all_plot_data(page) if not traces]
        raise AssertionError(f"plots without data after 30 s: {titles}") from None


def plot_values(page) -> list:
    """(title, the traces' y and z as JSON) of every plot."""
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".map(p => [p.querySelector('.gtitle')?.textContent, JSON.stringify((p.data || []).map(t => [t.y, t.z]))])"
    )


OVERFLOW = """() => {
  const out = [];
  for (const box of document.querySelectorAll('.wb-root, .wb-root .widget-box, .wb-root .widget-gridbox')) {
    const outer = box.getBoundingClientRect();
    if (outer.width === 0) continue;
    for (const child of box.children) {
      const inner = child.getBoundingClientRect();
      if (inner.width && inner.right > outer.right + 1)
        out.push(`${child.className} overflows ${box.className} by ${Math.round(inner.right - outer.right)}px`);
    }
  }
  for (const plot of document.querySelectorAll('.wb-root .js-plotly-plot')) {
    const svg = plot.querySelector('.main-svg');
    const cell = plot.parentElement.getBoundingClientRect();
    if (svg && svg.getBoundingClientRect().right > cell.right + 1) {
      const title = plot.querySelector('.gtitle')?.textContent;
      const [width, room] = [svg.getBoundingClientRect().width, cell.width].map(Math.round);
      out.push(`plot '${title}' (${(plot.data || []).length} traces) is ${width}px, its cell ${room}px`);
    }
  }
  return out;
}"""


@pytest.mark.parametrize("width", [1280, 1600])
def test_the_layout_fits_its_panels(page, width):
    page.set_viewport_size({"width": width, "height": 1400})
    time.sleep(1.5)  # plots resize on the window's resize event
    overflows = page.evaluate(OVERFLOW)
    assert overflows == [], "\n".join(overflows)
    sliders = page.evaluate(
        "() => Array.from(document.querySelectorAll('.wb-root .widget-hslider .slider-container'))"
        ".filter(s => s.offsetParent).map(s => s.getBoundingClientRect().width)"
    )
    assert sliders and min(sliders) >= 60, sliders  # usable tracks
    cut = page.evaluate(
        "() => Array.from(document.querySelectorAll('.wb-root button, .wb-root .widget-label,"
        " .wb-root .widget-label-basic')).filter(e => e.offsetParent && e.scrollWidth > e.clientWidth + 1)"
        ".map(e => e.textContent)"
    )
    assert cut == [], cut  # labels shown whole
    page.locator(".wb-activations").first.evaluate("panel => panel.scrollIntoView({block: 'start'})")
    time.sleep(0.5)
    save_screenshot(page, page.root / f"workbench-{width}.png")  # the plots this test checks


def test_a_reload_restores_every_plot_and_the_next_turn_reaches_them(page):
    from playwright.sync_api import expect

    page.locator(".lm-AccordionPanel-title, .jupyter-widget-Collapse-header", has_text="Sweep").first.click()
    button(page, "Run sweep").click()
    expect(page.locator(".wb-sweep").first).to_be_visible(timeout=TURN_S)
    # The sweep's table and its plot reach the page as separate widget messages: wait for the plot too.
    wait_for_plot_data(page)
    save_screenshot(page, page.root / "sweep.png", page.locator(".wb-sweep-panel").first)
    before = all_plot_data(page)
    assert len(before) == 6 and all(len(traces) > 1 for traces in before), before
    page.keyboard.press("Control+s")
    time.sleep(1.0)
    page.reload()
    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 6", timeout=60_000)
    wait_for_plot_data(page)
    assert all_plot_data(page) == before
    # The restored plots still take the kernel's updates: a new turn redraws every activation plot.
    values = plot_values(page)
    send(page, "Name a colour.", expect)
    expect(button(page, "Send")).to_be_enabled(timeout=TURN_S)
    page.wait_for_function(
        "(before) => Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".filter(p => !(p.querySelector('.gtitle')?.textContent || '').includes('against scale'))"
        ".every((p, i) => JSON.stringify((p.data || []).map(t => [t.y, t.z])) !== before[i])",
        arg=[value for title, value in values if "against scale" not in title],
        timeout=30_000,
    )
    after = dict(plot_values(page))
    assert [title for title, value in values if after[title] == value] == [
        title for title, _ in values if "against scale" in title
    ]


EDITED_AT_ONCE = """import plotly.graph_objects as go
from workbench.notebook import plot_widget

# plotly's bundle made to finish loading on the page 3 s late, as on a busy machine: the
# figure and its edits below arrive before it.
late = "await new Promise((done) => setTimeout(done, 3000));\\n"
plot_widget._bundle_text = lambda text=plot_widget._bundle_text(): late + text

figure = plot_widget.PlotWidget(go.Figure(go.Scatter(y=[1, 3, 2], name="drawn")))
display(figure)
figure.add_trace(go.Scatter(y=[2, 1, 3], name="added"))
figure.update_layout(title_text="edited at once");"""


def test_a_figure_edited_before_plotly_loads_draws_every_edit(lab, browser):
    """Edits that reach the page while plotly's code is still loading are drawn once it is
    loaded (the figure's start-up returns at once, within anywidget's 2-second limit)."""
    import nbformat

    url, token, root = lab
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(EDITED_AT_ONCE)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(notebook, root / "late_plotly.ipynb")
    tab = open_tab(browser, root, "late-plotly-console.log")
    try:
        # A workspace of its own: the default one would also open the workbench notebook here.
        open_notebook(tab, f"{url}/lab/workspaces/late/tree/late_plotly.ipynb?reset&token={token}")
        run_all(tab)
        tab.wait_for_function(
            "() => document.querySelector('.js-plotly-plot .gtitle')?.textContent === 'edited at once'",
            timeout=120_000,
        )
        names = tab.evaluate("() => document.querySelector('.js-plotly-plot').data.map(t => t.name)")
        assert names == ["drawn", "added"]
    finally:
        save_screenshot(tab, root / "late-plotly.png")
        tab.close()
