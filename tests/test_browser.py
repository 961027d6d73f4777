"""The playground notebook in a real browser: JupyterLab + headless Chromium, live widgets.

What it checks: JupyterLab serves notebooks/02_playground.ipynb, "Run > Run All Cells"
runs it (with LIPDP_SMOKE=1, so it is short) without an error output, the ipywidgets
render as widgets (not as their text fallback), and a matplotlib figure shows if the
notebook draws one. It saves a screenshot to build/screenshots/02_playground.png.

How to run it (Debian/Ubuntu; Playwright drives the system Chromium, so no
`playwright install` is needed):

    apt-get install -y chromium
    pip install playwright jupyterlab
    python -m pytest tests/test_browser.py -m slow

It is skipped when /usr/bin/chromium, the playwright package or jupyterlab is missing,
and it is marked slow, so `python -m pytest -m "not slow"` (CI) leaves it out. It takes
about 30 s on 2 cores. To try another folder laid out like the repository (a stand-in
notebooks/02_playground.ipynb): `python tests/test_browser.py ROOT_DIR [SCREENSHOT.png]`.

The repository is left as it was: the server gets its own configuration folder (under
pytest's tmp_path), in which autosave is off, its checkpoints go there too, and the test
checks the notebook's bytes afterwards.
"""

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/02_playground.ipynb"
SCREENSHOT = REPO_ROOT / "build" / "screenshots" / "02_playground.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_TIMEOUT_S = 90
KERNEL_START_TIMEOUT_S = 120
WIDGET_TIMEOUT_S = 180
RUN_ALL_TIMEOUT_S = 600
MIN_SCREENSHOT_BYTES = 20_000

# Rendered ipywidgets views (the widget manager's DOM, not the text/plain fallback).
WIDGET_SELECTOR = ", ".join(
    f".jp-OutputArea-output .{name}" for name in (
        "widget-slider", "widget-dropdown", "widget-toggle-buttons", "widget-button",
        "widget-checkbox", "widget-radio", "widget-text", "widget-box",
    )
)
IMAGE_SELECTOR = ".jp-OutputArea-output img"

# Settings for the server's own, temporary, JupyterLab configuration folder: never save
# the notebook (the run must leave the repository untouched), no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
}

# JavaScript run in the page, through the app object that --LabApp.expose_app_in_browser
# publishes as window.jupyterapp. The notebook panel is looked up by path.
_PANEL_JS = """(path) => {
    const app = window.jupyterapp;
    if (!app) return null;
    for (const widget of app.shell.widgets('main')) {
        if (widget.context && widget.context.path === path && widget.content
            && widget.content.model) return widget;
    }
    return null;
}"""
KERNEL_IDLE_JS = f"""(path) => {{
    const panel = ({_PANEL_JS})(path);
    const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle' && panel.context.isReady;
}}"""
# Done: the kernel is idle and every non-empty code cell has a new execution count, or
# some cell has an error output (Run All stops there).
RUN_DONE_JS = f"""(path) => {{
    const panel = ({_PANEL_JS})(path);
    if (!panel) return false;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    let pending = false, error = false;
    for (const cell of panel.content.widgets) {{
        if (cell.model.type !== 'code') continue;
        const outputs = cell.model.outputs.toJSON();
        if (outputs.some(o => o.output_type === 'error')) error = true;
        if (cell.model.sharedModel.getSource().trim() && cell.model.executionCount === null) pending = true;
        if (cell.promptNode && cell.promptNode.textContent.includes('*')) pending = true;
    }}
    return error || (!pending && !!kernel && kernel.status === 'idle');
}}"""
SUMMARY_JS = f"""(path) => {{
    const panel = ({_PANEL_JS})(path);
    const cells = [];
    for (const cell of panel.content.widgets) {{
        if (cell.model.type !== 'code') continue;
        cells.push({{
            source: cell.model.sharedModel.getSource().slice(0, 80),
            execution_count: cell.model.executionCount,
            errors: cell.model.outputs.toJSON().filter(o => o.output_type === 'error')
                .map(o => o.ename + ': ' + o.evalue),
        }});
    }}
    return cells;
}}"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_lab_settings(config_dir):
    settings_dir = config_dir / "lab" / "user-settings"
    for relative, values in LAB_SETTINGS.items():
        path = settings_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _start_lab(root_dir, work_dir, port, token):
    """JupyterLab on 127.0.0.1:port serving root_dir, its configuration under work_dir."""
    config_dir = work_dir / "jupyter-config"
    _write_lab_settings(config_dir)
    env = dict(
        os.environ,
        LIPDP_SMOKE="1",
        JUPYTER_CONFIG_DIR=str(config_dir),
        JUPYTER_RUNTIME_DIR=str(work_dir / "jupyter-runtime"),
    )
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",  # no PyPI queries for extensions
        # Checkpoints go to work_dir, not to a .ipynb_checkpoints/ folder in the repository
        # (FileCheckpoints joins this to the notebook's folder: an absolute path wins).
        f"--FileCheckpoints.checkpoint_dir={work_dir / 'checkpoints'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers, CI runners
        command.append("--allow-root")
    log = open(work_dir / "jupyterlab.log", "wb")
    try:
        process = subprocess.Popen(command, env=env, cwd=root_dir, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    return process


def _wait_for_server(process, url, log_path, timeout_s=SERVER_START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer in {timeout_s} s:\n{log_path.read_text()[-4000:]}")


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def _notebook_draws_figures(path):
    sources = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                        if cell["cell_type"] == "code")
    return any(word in sources for word in ("matplotlib", "plt.", "lipdp.plots", "from lipdp import plots"))


def run_notebook_in_browser(root_dir, notebook, screenshot, work_dir):
    """Open root_dir/notebook in JupyterLab in headless Chromium, run all cells, screenshot it.

    Returns a summary dict: code cells (source start, execution count, errors), the number
    of rendered widgets and of images, the log path. Raises on a time-out.
    """
    from playwright.sync_api import sync_playwright

    root_dir, work_dir, screenshot = Path(root_dir), Path(work_dir), Path(screenshot)
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    process = _start_lab(root_dir, work_dir, port, token)
    try:
        _wait_for_server(process, f"{base}/api/status?token={token}", work_dir / "jupyterlab.log")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                try:
                    page.goto(f"{base}/lab/tree/{notebook}?token={token}")
                    page.wait_for_function(KERNEL_IDLE_JS, arg=notebook, timeout=KERNEL_START_TIMEOUT_S * 1000)
                    # Fresh state: stored outputs and execution counts go (in the browser only).
                    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
                    # What a reader does: the menu bar's Run > Run All Cells.
                    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                    page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
                    page.wait_for_function(RUN_DONE_JS, arg=notebook, timeout=RUN_ALL_TIMEOUT_S * 1000,
                                           polling=500)
                    cells = page.evaluate(SUMMARY_JS, notebook)
                    if not any(cell["errors"] for cell in cells):
                        page.wait_for_selector(WIDGET_SELECTOR, state="visible", timeout=WIDGET_TIMEOUT_S * 1000)
                        if _notebook_draws_figures(root_dir / notebook):
                            page.wait_for_selector(IMAGE_SELECTOR, state="visible",
                                                   timeout=WIDGET_TIMEOUT_S * 1000)
                        page.locator(WIDGET_SELECTOR).first.scroll_into_view_if_needed()
                    page.wait_for_timeout(1000)  # let the last figures and widget views paint
                    widgets = page.locator(WIDGET_SELECTOR).count()
                    images = page.locator(IMAGE_SELECTOR).count()
                    widget_errors = page.locator(".jp-OutputArea-output", has_text="Error displaying widget").count()
                finally:  # also on failure: the picture shows what went wrong
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshot), full_page=True)
            finally:
                browser.close()
    finally:
        _stop(process)
    return {"cells": cells, "widgets": widgets, "images": images, "widget_errors": widget_errors,
            "log": work_dir / "jupyterlab.log"}


def _skip_reason():
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab")):
        if importlib.util.find_spec(module) is None:
            return f"the {package} package is missing (pip install {package})"
    return None


@pytest.mark.slow
def test_playground_renders_widgets_in_jupyterlab(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    notebook = REPO_ROOT / NOTEBOOK
    if not notebook.exists():
        pytest.skip(f"{NOTEBOOK} does not exist yet")
    before = notebook.read_bytes()
    if SCREENSHOT.exists():
        SCREENSHOT.unlink()

    result = run_notebook_in_browser(REPO_ROOT, NOTEBOOK, SCREENSHOT, tmp_path)

    errors = [(cell["source"], cell["errors"]) for cell in result["cells"] if cell["errors"]]
    assert not errors, errors
    assert all(cell["execution_count"] is not None or not cell["source"].strip() for cell in result["cells"])
    assert result["widgets"] > 0 and result["widget_errors"] == 0, result
    if _notebook_draws_figures(notebook):
        assert result["images"] > 0, result
    assert SCREENSHOT.exists() and SCREENSHOT.stat().st_size > MIN_SCREENSHOT_BYTES
    assert notebook.read_bytes() == before, "the browser run changed the notebook file"


if __name__ == "__main__":  # development: python tests/test_browser.py ROOT_DIR [SCREENSHOT]
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    shot = Path(sys.argv[2]) if len(sys.argv) > 2 else SCREENSHOT
    work = root / "build" / "browser-test"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(run_notebook_in_browser(root, NOTEBOOK, shot, work))
