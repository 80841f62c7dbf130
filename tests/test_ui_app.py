"""The web UI's shell: the app is served on localhost, shows its runs folder, and renders in a real browser."""

from ui_browser import screenshot, ui_server

from tunelab.ui.context import UIContext


def test_app_serves_in_a_browser(tmp_path, browser_page):
    ctx = UIContext(tmp_path / "runs")
    with ui_server(ctx, tabs=[]) as url:
        assert url.startswith("http://127.0.0.1:")
        browser_page.goto(url)
        browser_page.get_by_text(str(ctx.runs)).wait_for()
        screenshot(browser_page, tmp_path / "shell.png")
    assert (tmp_path / "shell.png").stat().st_size > 1000
