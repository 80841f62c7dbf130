"""The web UI's shell: the app is served on localhost, shows its runs folder, and renders in a real browser."""

from pathlib import Path

from ui_browser import screenshot, ui_server

from tunelab.ui.context import UIContext


def test_app_serves_in_a_browser(tmp_path, browser_page):
    ctx = UIContext(tmp_path / "runs")
    with ui_server(ctx, tabs=[]) as url:
        assert url.startswith("http://127.0.0.1:")
        browser_page.goto(url)
        browser_page.get_by_text(str(ctx.runs)).wait_for()
        assert browser_page.get_by_text("Use via API").count() == 0
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


def test_downloads_share_one_temp_folder_removed_at_exit(tmp_path):
    """Files handed to the browser (a download, a zipped folder) sit in this process's one temp folder, with
    their content, and the folder is gone once the process exits."""
    import subprocess
    import sys
    import zipfile

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.txt").write_text("hello")
    code = (
        "import sys; from pathlib import Path; from tunelab.ui.shared import offer, zip_folder, scratch_root\n"
        f"f, z = Path(offer({str(tmp_path / 'run' / 'a.txt')!r})), Path(zip_folder({str(tmp_path / 'run')!r}))\n"
        "assert f.read_text() == 'hello' and scratch_root() in f.parents and scratch_root() in z.parents\n"
        "print(scratch_root()); print(z)\n"
        "import shutil; shutil.copy(z, sys.argv[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "copy.zip")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    root = Path(out.stdout.splitlines()[0])
    assert root.name.startswith("tunelab-ui-") and not root.exists()
    assert zipfile.ZipFile(tmp_path / "copy.zip").read("run/a.txt") == b"hello"
