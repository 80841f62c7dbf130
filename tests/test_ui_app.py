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


def test_cli_binds_to_localhost_and_does_not_share_unless_asked():
    from tunelab.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.share, args.runs) == ("127.0.0.1", False, "runs")
    from tunelab.ui.app import serve_options

    opts = serve_options()
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False and opts["show_error"] is False


def test_an_internal_error_shows_no_traceback(tmp_path, browser_page, monkeypatch):
    """A handler that fails unexpectedly: the page says there was an error, and shows neither the exception's
    text nor a traceback (launch(show_error=False))."""
    from tunelab.ui import train

    def broken(*args, **kwargs):
        raise RuntimeError("internal-detail-xyz")

    monkeypatch.setattr(train, "check_text", broken)
    with ui_server(UIContext(tmp_path / "runs"), tabs=["Train"]) as url:
        browser_page.goto(url)
        browser_page.locator("#train-check").click()
        browser_page.get_by_text("Error", exact=True).first.wait_for()  # the outputs' status: the handler failed
        browser_page.wait_for_timeout(3000)  # a toast's text would come after that (show_error=True: the message)
        html = browser_page.content()
    assert "internal-detail-xyz" not in html and "Traceback" not in html
