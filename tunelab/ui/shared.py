"""What the Chat, Compare and Evaluate & export tabs share: the runs and models a form offers, errors
shown beside a form as the CLI words them, and files handed to the browser for download."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import user_errors
from tunelab.models import NAMED
from tunelab.stages.runs import result_dir

log = logging.getLogger("tunelab.ui")


def finished_runs(runs: Path, depth: int = 4) -> list[Path]:
    """Run folders with a result (final/tunelab.json) under `runs`, at most `depth` folders down (a grid's
    cells sit at runs/GRID/cells/CELL), newest first."""
    found, level = [], [Path(runs)]
    for _ in range(depth):
        level = [d for parent in level if parent.is_dir() for d in parent.iterdir() if d.is_dir()]
        found += [d for d in level if result_dir(d) is not None]
        level = [d for d in level if not d.name.startswith(".") and d.name != "final"]
    return sorted(found, key=lambda d: (result_dir(d) / "tunelab.json").stat().st_mtime, reverse=True)


def model_choices(runs: Path) -> list[tuple[str, str]]:
    """(shown, value) for a dropdown: finished runs (relative to `runs`), then the named models; a
    dropdown built with allow_custom_value also takes any folder, .gguf file or hub id typed in."""
    shown = [(str(d.relative_to(runs)), str(d)) for d in finished_runs(runs)]
    return shown + [(f"{name} (named model)", name) for name in NAMED]


def model_picker(runs: Path, checkbox: str):
    """The row that picks a run or model (Chat, Evaluate & export): the dropdown, a button that re-reads the runs
    folder, and one checkbox of the tab's; returns (dropdown, checkbox). Call inside the tab's layout."""
    import gradio as gr

    with gr.Row():
        spec = gr.Dropdown(model_choices(runs), label="Run or model", allow_custom_value=True, scale=4,
                           info="a run under the runs folder, a named model, or type a folder, a .gguf or a hub id")  # fmt: skip
        refresh = gr.Button("Refresh list", scale=0)
        box = gr.Checkbox(False, label=checkbox, scale=1)
    refresh.click(lambda: gr.update(choices=model_choices(runs)), None, spec)
    return spec, box


def error_markdown(e: BaseException) -> str:
    """The message `tunelab` prints for this error (after "tunelab: error: "), for a gr.Markdown beside the
    form. An error that is not the user's is named as the CLI names it, never shown as a traceback."""
    if isinstance(e, user_errors()):
        return f"**tunelab: error:**\n\n```text\n{e}\n```"
    log.exception("internal error in the UI")  # the traceback goes to the server's log, not the page
    return (f"**tunelab: internal error:** `{type(e).__name__}: {e}`\n\nThis is not something your input should "
            "cause; the traceback is in the log of the `tunelab ui` process.")  # fmt: skip


@functools.cache
def scratch_root() -> Path:
    """This process's one temp folder for files handed to the browser (downloads, plots), removed when the
    process exits, so a long-running UI does not leave a folder in /tmp per click behind it."""
    root = Path(tempfile.mkdtemp(prefix="tunelab-ui-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def scratch(prefix: str = "") -> Path:
    """A fresh folder under scratch_root()."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def offer(path: str | Path) -> str:
    """A path the browser may download: Gradio serves only files under the working folder, the temp folder
    or launch()'s allowed_paths, and a run folder may be anywhere, so the file is hard-linked (copied
    across file systems) into a fresh temp folder under its own name."""
    src = Path(path)
    dst = scratch() / src.name
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


def zip_folder(folder: str | Path) -> str:
    """The folder as FOLDER.zip (its name as the top folder inside), in a fresh temp folder, for download."""
    folder = Path(folder)
    target = scratch() / folder.name
    return shutil.make_archive(str(target), "zip", root_dir=folder.parent, base_dir=folder.name)
