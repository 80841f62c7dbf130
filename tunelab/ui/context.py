"""What every tab of the UI shares: the folder runs live under and where background jobs are kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UIContext:
    runs: Path  # run folders (one per training / compare) are created under it

    @property
    def jobs(self) -> Path:
        """Background jobs' records and logs (jobs.py); under the runs folder so reopening the UI finds them."""
        return self.runs / ".ui-jobs"


def on_page_load(fn, inputs=None, outputs=None, **kwargs):
    """Run `fn` each time a browser opens the page (Blocks.load), from inside a tab's `build_tab`, which gets no
    handle on the app: the Blocks being built is Gradio's current root block. Returns the event (for .then)."""
    import gradio as gr

    root = gr.context.Context.root_block
    if root is None:
        raise RuntimeError("on_page_load: call it while the app's gr.Blocks is being built (inside build_tab)")
    return root.load(fn, inputs, outputs, show_progress="hidden", **kwargs)
