"""The browser-test harness of the web UI (tunelab/ui): the app served on a free local port, and a headless
Chromium page driven by Playwright's sync API.

    from ui_browser import ui_server          # the `browser_page` fixture comes from tests/conftest.py

    def test_x(tmp_path, browser_page):
        with ui_server(UIContext(tmp_path / "runs"), tabs=["Train"]) as url:
            browser_page.goto(url)
            ...

The browser is the system's Chromium (Debian's `chromium` package: `apt-get install -y chromium`), launched by
Playwright (`pip install playwright`; its own browser downloads are not needed). Without either the tests skip
with the command that installs it, except when TUNELAB_REQUIRE_BROWSER=1 (.ci/run sets it): then they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str | None:
    env = os.environ.get("TUNELAB_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ui_server(ctx, tabs: list[str] | None = None):
    """Serve `build_app(ctx, tabs)` on a free 127.0.0.1 port in this process (Gradio's server thread); yields
    its URL and closes the server afterwards."""
    from tunelab.ui.app import build_app, serve_options

    ctx.runs.mkdir(parents=True, exist_ok=True)
    app = build_app(ctx, tabs=tabs)
    port = free_port()
    app.launch(**serve_options("127.0.0.1", port), prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close(verbose=False)


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -e '.[dev]' (or pip install playwright)"
    if chromium_path() is None:
        return "no Chromium found: apt-get install -y chromium (Debian / Ubuntu), or set TUNELAB_CHROMIUM"
    return None


@pytest.fixture(scope="session")
def chromium_browser():
    missing = _missing()
    if missing:
        if os.environ.get("TUNELAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required (TUNELAB_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # Chromium refuses root otherwise
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def browser_page(chromium_browser):
    """A fresh page (its own context) that may only reach 127.0.0.1: anything else (web fonts, CDNs) is refused
    at once, so an offline machine does not wait on it."""
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", _local_only)
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def _local_only(route) -> None:
    url = route.request.url
    if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()


def screenshot(page, path: Path) -> Path:
    """A full-page PNG (each browser test saves one per page under its tmp_path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path
