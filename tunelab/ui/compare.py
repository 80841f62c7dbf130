"""The Compare tab: load a grid (an example, an uploaded or pasted YAML) or build one from checkboxes,
check it as `tunelab config GRID` does, run it as `tunelab compare GRID` in the background, watch its cells
finish, and read the results table (with 95% intervals), the recommendation and the report's plots.

The grid always runs from a file: the one loaded when its text is unchanged, else the editor's text saved
under the runs folder (.ui-grids/), so the job is an ordinary `tunelab compare FILE` that the CLI can
resume. Progress is read from what the command writes: results.db while it runs (read-only), then
results.json, results.md and report.html in the grid's output_dir. Every grid run started from the UI stays
listed (newest first): picking an earlier one shows its state and what its output_dir holds.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from pathlib import Path

import yaml

from tunelab.compare.grid import load_grid
from tunelab.compare.record import fmt, table_cells
from tunelab.compare.run import describe_grid, planned_keys
from tunelab.config import ConfigError
from tunelab.data import tasks
from tunelab.methods import names as method_names
from tunelab.models import NAMED
from tunelab.ui import jobs
from tunelab.ui.context import UIContext
from tunelab.ui.shared import error_markdown, offer, scratch
from tunelab.ui.watch import job_label

CELL_HEADER = ["Model", "Method", "Task", "Seed", "Status", "Metric", "Value", "n", "Time (s)", "Error"]
GRID_TASK_TYPES = ("classification", "regression", "instruction")  # what `tunelab compare` runs


def example_grids() -> list[Path]:
    """examples/compare-*.yaml of the checkout tunelab runs from, and of the working folder."""
    roots = [Path(__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"]
    found = {p.resolve(): p for root in roots if root.is_dir() for p in sorted(root.glob("compare-*.y*ml"))}
    return list(found.values())


def grid_file(text: str, source: str | None, runs: Path) -> Path:
    """The file the grid runs from: `source` when the text is its content, else the text saved (by content)
    under runs/.ui-grids/."""
    if source and Path(source).is_file() and Path(source).read_text(encoding="utf-8") == text:
        return Path(source)
    stem = Path(source).stem if source else "grid"
    path = runs / ".ui-grids" / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def check(text: str, source: str | None, runs: Path) -> tuple[Path, str]:
    """(the grid's file, what `tunelab config FILE` prints); ConfigError with its message when invalid."""
    if not (text or "").strip():
        raise ConfigError("the grid is empty: load an example, upload or paste a grid, or build one above")
    path = grid_file(text, source, runs)
    return path, describe_grid(str(path))


def build_grid(models: list[str], extra_models: str, methods: list[str], task_names: list[str], train_limit,
               dev_limit, steps, output_dir: str) -> str:  # fmt: skip
    """A small grid's YAML from the form: models × methods × tasks, each cell `steps` optimizer steps."""
    chosen = list(models or []) + [m.strip() for m in (extra_models or "").split(",") if m.strip()]
    limits = {k: int(v) for k, v in (("train_limit", train_limit), ("dev_limit", dev_limit)) if v}
    grid = {
        "output_dir": output_dir,
        "base": {"training": {"max_steps": int(steps), "batch_size": 4}} if steps else {},
        "models": chosen,
        "methods": list(methods or []),
        "tasks": [{"name": t, **limits} for t in task_names or []],
    }
    return yaml.safe_dump(grid, sort_keys=False)


def cell_rows(output_dir: Path, keys: list[str]) -> list[list]:
    """The grid's rows as results.db holds them now (read-only: the running compare writes it)."""
    db = Path(output_dir) / "results.db"
    if not db.is_file() or not keys:
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        marks = ",".join("?" * len(keys))
        found = con.execute(
            "SELECT key, model, method, task, seed, status, main_metric, main_value, n, wall_s, error FROM cells "
            f"WHERE key IN ({marks})",
            keys,  # fmt: skip
        ).fetchall()
    except sqlite3.OperationalError:  # the table is being created
        return []
    finally:
        con.close()
    order = {k: i for i, k in enumerate(keys)}
    rows = sorted(found, key=lambda r: order[r[0]])
    return [[m, meth, t, "" if s is None else s, st, mm or "", fmt(v), "" if n is None else n,
             "" if w is None else round(w, 1), (e or "").splitlines()[0][:160] if e else ""]
            for _, m, meth, t, s, st, mm, v, n, w, e in rows]  # fmt: skip


_shown: dict[Path, tuple[tuple, tuple]] = {}  # output_dir -> (its files' mtimes, results() of them)


def results(output_dir: Path) -> tuple[list[str], list[list[str]], str, list[tuple[str, str]], str | None]:
    """A finished grid's outputs: (table header, table rows, the summary of results.md, the report's plots as
    (png path, caption), report.html to download). Read again only when the files change (the page asks
    every few seconds)."""
    import json

    out = Path(output_dir)
    files = [out / "results.json", out / "results.md", out / "report.html"]
    stamp = tuple(f.stat().st_mtime_ns if f.is_file() else None for f in files)
    if out in _shown and _shown[out][0] == stamp:
        return _shown[out][1]
    rows = json.loads(files[0].read_text()) if stamp[0] else []
    header, body = table_cells(rows)
    md = files[1].read_text(encoding="utf-8") if stamp[1] else ""
    summary = md.split("\n## Every row", 1)[0] if "\n## Every row" in md else ""
    shown = (header, body, summary, plots(files[2]), offer(files[2]) if stamp[2] else None)
    _shown[out] = (stamp, shown)
    return shown


def plots(report: Path) -> list[tuple[str, str]]:
    """The PNG plots report.html embeds, as files (a gallery shows them), captioned with their task."""
    if not report.is_file():
        return []
    html = report.read_text(encoding="utf-8")
    folder = scratch("plots-")
    shown = []
    task = ""
    for m in re.finditer(r"<h2>(.*?)</h2>|<img alt=\"plot\" src=\"data:image/png;base64,([A-Za-z0-9+/=]+)\">", html):
        if m.group(1) is not None:
            task = m.group(1)
            continue
        path = folder / f"plot-{len(shown)}.png"
        path.write_bytes(base64.b64decode(m.group(2)))
        shown.append((str(path), task))
    return shown


def compare_jobs(jobs_dir: Path) -> list[jobs.Job]:
    return [j for j in jobs.list_jobs(jobs_dir) if j.argv[:1] == ["compare"]]


def job_choices(jobs_dir: Path) -> list[list[str]]:
    """[label, job id] of each grid run (`tunelab compare` job), newest first; the label says its state."""
    return [[job_label(j), j.id] for j in compare_jobs(jobs_dir)]


def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    examples = example_grids()
    with gr.Row():
        first = next((p for p in examples if p.name == "compare-sst2.yaml"), examples[0] if examples else None)
        example = gr.Dropdown([(p.name, str(p)) for p in examples], label="Example grid", scale=3,
                              value=str(first) if first else None)  # fmt: skip
        load_example = gr.Button("Load example", scale=1)
        upload = gr.File(label="or upload a grid YAML", file_types=[".yaml", ".yml"], type="filepath", scale=2)
    with gr.Accordion("Build a small grid (models × methods × tasks)", open=False):
        presets = [t for t in tasks.task_names() if tasks.get_task(t).type in GRID_TASK_TYPES]
        with gr.Row():
            models = gr.CheckboxGroup(list(NAMED), value=[next(iter(NAMED))], label="models")
            extra_models = gr.Textbox(label="more models (folders, .gguf files, hub ids; comma-separated)")
        methods = gr.CheckboxGroup(method_names(), value=["lora"], label="methods")
        task_box = gr.CheckboxGroup(presets, value=["sst2"], label="tasks")
        with gr.Row():
            train_limit = gr.Number(96, label="train_limit (rows)", precision=0)
            dev_limit = gr.Number(200, label="dev_limit (rows scored)", precision=0)
            steps = gr.Number(24, label="training.max_steps per cell", precision=0)
            output_dir = gr.Textbox(str(ctx.runs / "compare-ui"), label="output_dir")
        build = gr.Button("Build the grid's YAML")
    source = gr.State(None)  # the file the editor's text came from
    editor = gr.Code(language="yaml", label="Grid (edit freely; docs/compare.md)", elem_id="compare-grid")
    with gr.Row():
        validate = gr.Button("Check (tunelab config)")
        launch = gr.Button("Run (tunelab compare)", variant="primary", elem_id="compare-run")
        stop = gr.Button("Stop")
    error = gr.Markdown(elem_id="compare-error")
    plan = gr.Code(label="Cells", language=None, interactive=False, lines=4)
    job_id = gr.State(None)
    picked = gr.Dropdown(choices=[], label="grid run", info="every grid run started from this UI (newest first); "
                         "an earlier one shows what its output_dir holds now", elem_id="compare-job")  # fmt: skip
    status = gr.Markdown(elem_id="compare-status")
    cells = gr.Dataframe(headers=CELL_HEADER, label="Cells (results.db, live)", interactive=False,
                         elem_id="compare-cells")  # fmt: skip
    summary = gr.Markdown(elem_id="compare-summary")
    table = gr.Dataframe(label="Results (results.json: every row with its 95% interval)", interactive=False,
                         elem_id="compare-results")  # fmt: skip
    gallery = gr.Gallery(label="report.html's plots", columns=2, height="auto", elem_id="compare-plots")
    report = gr.File(label="report.html", interactive=False, elem_id="compare-report")
    with gr.Accordion("Log", open=False):
        log = gr.Code(language=None, interactive=False, lines=12)
    timer = gr.Timer(2.0)

    def read_file(path):
        if not path:
            return "", None, ""
        try:
            return Path(path).read_text(encoding="utf-8"), str(path), ""
        except (OSError, UnicodeDecodeError) as e:
            return gr.update(), gr.update(), error_markdown(ConfigError(f"{path}: cannot read it as a grid YAML: {e}"))

    load_example.click(read_file, example, [editor, source, error])
    upload.upload(read_file, upload, [editor, source, error])
    build.click(lambda *a: (build_grid(*a), None, ""),
                [models, extra_models, methods, task_box, train_limit, dev_limit, steps, output_dir],
                [editor, source, error])  # fmt: skip

    def on_check(text, src):
        try:
            return "", check(text, src, ctx.runs)[1]
        except Exception as e:  # noqa: BLE001 - shown beside the editor, as the CLI words it
            return error_markdown(e), ""

    validate.click(on_check, [editor, source], [error, plan])

    def on_launch(text, src, current):
        try:
            running = jobs.load(ctx.jobs / current) if current else None
            if running is not None and running.running():
                raise ConfigError("a grid is running; stop it first (it resumes where it stopped when run again)")
            path, described = check(text, src, ctx.runs)
            out = str(Path(load_grid(str(path)).output_dir).resolve())
            job = jobs.start(ctx.jobs, ["compare", str(path)], run_dir=out)
            return "", described, job.id
        except Exception as e:  # noqa: BLE001 - shown beside the editor, as the CLI words it
            return error_markdown(e), gr.update(), current

    launch.click(on_launch, [editor, source, job_id], [error, plan, job_id])

    def on_stop(current):
        job = jobs.load(ctx.jobs / current) if current else None
        if job is not None:
            job.stop()

    stop.click(on_stop, job_id, None)

    def watch(current, seen, listed):
        """`shown`'s outputs, and the list of grid runs when it changed since `listed` (the one picked, or the
        newest if none is: a reopened UI finds the grid it left running)."""
        now = job_choices(ctx.jobs)
        current = current or (now[0][1] if now else None)
        runs = gr.update() if now == listed else gr.update(choices=[tuple(c) for c in now], value=current)
        return (*shown(current, seen), runs, now)

    def shown(current, seen):
        """The job's state, its cells, and once it ended the results. Parts that did not change since `seen`
        are left as they are on the page."""
        if not current:
            return (None, "No grid run yet.") + (gr.update(),) * 7
        job = jobs.load(ctx.jobs / current)
        if job is None:
            return (current, "Starting ...") + (gr.update(),) * 7
        state = job.state()
        out = Path(job.run_dir or ".")
        head = f"**{state}** · `tunelab {' '.join(job.argv)}` · output `{out}`"
        live = cell_rows(out, planned_keys(out) or [])  # the rows the run planned (none yet while it plans)
        if state == "running":
            return current, head, live, "", gr.update(), gr.update(), gr.update(), job.tail(60), None
        header, body, text, shown, html = results(out)
        now = (current, state, _shown.get(out, (None,))[0])
        if now == seen:
            return current, head, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), job.tail(60), seen
        table_value = {"headers": header, "data": body} if body else None
        return current, head, live, text, table_value, shown, html, job.tail(60), now

    seen = gr.State(None)
    listed = gr.State([])  # the grid runs last sent: the dropdown is only updated when they change
    outputs = [job_id, status, cells, summary, table, gallery, report, log, seen, picked, listed]
    timer.tick(watch, [job_id, seen, listed], outputs, show_progress="hidden")
    picked.input(watch, [picked, seen, listed], outputs)
