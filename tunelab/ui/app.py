"""The UI's tabs, composed into one Gradio app, and `launch` (what `tunelab ui` calls)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from tunelab.ui.context import UIContext

# (title, module): each module has `build_tab(ctx: UIContext) -> None`, called inside its gr.Tab
TABS = [
    ("Train", "tunelab.ui.train"),
    ("Watch", "tunelab.ui.watch"),
    ("Runs", "tunelab.ui.runs"),
    ("Compare", "tunelab.ui.compare"),
    ("Chat", "tunelab.ui.chat"),
    ("Evaluate & export", "tunelab.ui.evaluate"),
]

# Gradio phones home (analytics, its version check) unless told not to; the UI must work offline and leak nothing.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_app(ctx: UIContext, tabs: list[str] | None = None):
    """The gr.Blocks app; `tabs` (titles) picks a subset, e.g. in tests of one tab."""
    import gradio as gr

    unknown = sorted(set(tabs or ()) - {title for title, _ in TABS})
    if unknown:
        raise ValueError(f"no tab {unknown}; the tabs: {[title for title, _ in TABS]}")

    with gr.Blocks(title="tunelab", analytics_enabled=False) as app:
        gr.Markdown(f"# tunelab\nRuns under `{ctx.runs}`")
        for title, module in TABS:
            if tabs is not None and title not in tabs:
                continue
            with gr.Tab(title, id=title.lower().split()[0]):
                importlib.import_module(module).build_tab(ctx)
    return app


def serve_options(host: str = "127.0.0.1", port: int | None = 7860, share: bool = False) -> dict:
    """The launch settings `tunelab ui` and the browser tests share: errors as a short message in the page,
    never a traceback; no server-side rendering (it needs Node); quiet; a footer without Gradio's "Use via
    API" page (the CLI and Python API are tunelab's; the UI's handlers are not a stable interface)."""
    return dict(server_name=host, server_port=port, share=share, show_error=False, ssr_mode=False, quiet=True,
                footer_links=["settings"])  # fmt: skip


def launch(runs: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    ctx = UIContext(Path(runs).resolve())
    ctx.runs.mkdir(parents=True, exist_ok=True)
    app = build_app(ctx)
    print(f"tunelab ui: http://{host}:{port}  (runs under {ctx.runs}; Ctrl-C stops the UI, not the runs it started)")
    return app.launch(**{**serve_options(host, port, share), **kwargs})
