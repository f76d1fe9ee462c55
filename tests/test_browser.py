"""The workbench in a real JupyterLab, driven by headless Chromium (Playwright).

JupyterLab serves a copy of notebooks/02_workbench.ipynb on loopback; the test
runs all cells, moves a steering slider, applies, sends a chat message from
the input box, and checks that the reply and an updated plot appear. A
screenshot is saved next to the copied notebook (and under $WORKBENCH_ARTIFACTS
if set).
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
    port, token = free_port(), "workbench-test"
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
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
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


def plot_y(page, index: int) -> list:
    """The first trace's y values of plot ``index``, once the widget has traces."""
    handle = page.wait_for_function(
        f"() => {{ const data = document.querySelectorAll('.js-plotly-plot')[{index}].data;"
        " return data.length > 0 && Array.from(data[0].y); }",
        timeout=60_000,
    )
    return handle.json_value()


def test_workbench_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, token, root = lab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        try:
            drive_workbench(page, url, token, expect)
            save_screenshot(page, root / "workbench.png")
        except BaseException:
            save_screenshot(page, root / "failure.png")
            raise
        finally:
            browser.close()


def save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if artifacts := os.environ.get("WORKBENCH_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


def drive_workbench(page, url: str, token: str, expect) -> None:
    page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
    # Run All is ignored until the kernel is up.
    expect(page.locator(".jp-StatusBar-TextItem", has_text="Idle").first).to_be_visible(timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

    # The notebook's own scripted turn finishes: the transcript shows it.
    transcript = page.locator(".widget-html-content", has_text="Tell me a fact about cats.")
    expect(transcript.first).to_be_visible(timeout=300_000)
    expect(page.locator(".legendtext", has_text="steered").first).to_be_visible(timeout=60_000)
    before = plot_y(page, 0)

    # Move the steering row's scale slider (through its editable readout) and apply.
    readout = page.locator(".widget-hslider:has(.widget-label:text-is('scale')) .widget-readout").first
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("-150")
    page.keyboard.press("Enter")
    page.locator("button.widget-button", has_text="Apply").click()
    expect(page.locator(".widget-html-content", has_text="-150").first).to_be_visible(timeout=60_000)

    # Chat from the input box.
    page.fill("input[placeholder='Say something']", "Name a colour.")
    page.locator("button.widget-button", has_text="Send").click()
    expect(page.locator(".widget-html-content", has_text="Name a colour.").first).to_be_visible(timeout=300_000)
    # The widget swaps its traces while updating, so data[0] may briefly be missing.
    page.wait_for_function(
        "(before) => { const data = document.querySelectorAll('.js-plotly-plot')[0].data;"
        " return data.length > 0 && JSON.stringify(Array.from(data[0].y)) !== JSON.stringify(before); }",
        arg=before,
        timeout=120_000,
    )
    html = page.locator(".widget-html-content", has_text="Name a colour.").first.inner_html()
    assert html.count("<b>steered:</b>") == 2 and html.count("<b>baseline:</b>") == 2
