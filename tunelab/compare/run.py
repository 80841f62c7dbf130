"""`run_grid`: resolve the cells, run what is missing, record every result, write the tables and report."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.compare.executors import executor_for
from tunelab.compare.grid import Grid, load_grid
from tunelab.compare.plan import Cell, resolve_cells
from tunelab.compare.record import fmt, fmt_time, plan_values, result_values
from tunelab.compare.references import reference_cell, reference_dir, references_for, run_reference
from tunelab.compare.report import analyse_grid, markdown_summary, with_intervals, write_report
from tunelab.compare.store import Store, markdown_table, write_exports
from tunelab.files import write_json_atomic

FINISHED = ("done", "n/a")


@dataclass
class GridResult:
    output_dir: Path
    rows: list[dict]  # the current grid's rows (per task: references, then cells), as in results.json
    trained_now: int = 0  # cells run by this call (whatever their outcome)
    skipped: int = 0  # cells finished by an earlier call and reused
    failed: int = 0  # cells whose latest attempt failed
    not_applicable: int = 0
    interrupted: bool = False
    report: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    analyses: dict[str, dict] = field(default_factory=dict)  # task -> compare.analysis.analyse(...)

    @property
    def summary(self) -> str:
        """Per task: what the numbers support and the per-method table (Markdown)."""
        return markdown_summary(self.analyses)

    @property
    def markdown(self) -> str:
        """Every row (Markdown)."""
        return markdown_table(self.rows)


def run_grid(
    grid: str | Path | dict | Grid,
    executor: str = "local",
    address: str | None = None,
    only_report: bool = False,
    retry_failed: bool = False,
    start_method: str | None = None,
    on_cell: Callable[[dict, dict], None] | None = None,
    cell_hooks: dict | None = None,
    log: Callable[[str], None] | None = None,
    seeds: list[int] | None = None,
) -> GridResult:
    """Run a comparison grid (YAML path, dict or Grid) and write results.db, results.{csv,json,md}, report.html.

    Finished cells (same key) are reused; an interrupted cell resumes from its checkpoint; a failed cell is
    kept as failed unless `retry_failed`. `on_cell(row, result)` is called after each cell (raise
    KeyboardInterrupt there to stop the grid as Ctrl-C would); `cell_hooks` are testing aids passed to
    every cell (`interrupt_at_step`, `fail_scoring`). `seeds` replaces the grid's `seeds:` list.
    """
    log = log or (lambda msg: print(msg, flush=True))
    g = grid if isinstance(grid, Grid) else load_grid(grid)
    if seeds:
        g = Grid.model_validate({**g.model_dump(), "seeds": list(seeds)})
    out = Path(g.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = resolve_cells(g, out, materialise=not only_report)
    write_plan(out, g, cells)
    store = Store(out / "results.db")
    result = GridResult(output_dir=out, rows=[])
    try:
        pending = _register(store, cells, retry_failed, result, out)
        ex = executor_for(executor, address=address, start_method=start_method) if pending and not only_report else None
        if ex is not None and hasattr(ex, "warm"):
            ex.warm()  # the cells' process server imports torch & co. while the references are fitted
        reference_keys = _record_references(store, g, out, log, run=not only_report)
        if ex is not None:
            log(f"[compare] {len(cells)} cells: {len(pending)} to run, {result.skipped} finished earlier ({out})")
            _run_cells(ex, store, pending, result, log, cell_hooks, on_cell)
        rows = _with_references(store.rows([c.key for c in cells]), store.rows(reference_keys), g)
        _write_outputs(result, rows, g, out)
    finally:
        store.close()
    return result


def _run_cells(ex, store: Store, pending: list[Cell], result: GridResult, log, hooks, on_cell) -> None:
    """Run the pending cells on the executor, recording each result as it comes; Ctrl-C stops the grid."""
    specs = [c.spec(Path(store.get(c.key)["cell_dir"]), hooks) for c in pending]
    by_key = {c.key: c for c in pending}

    def on_start(spec):
        store.upsert(spec["key"], status="running")

    def on_done(spec, res):
        cell = by_key[spec["key"]]
        store.upsert(spec["key"], **result_values(res, cell.eval.get("main_metric")))
        result.trained_now += 1
        log(_progress_line(result.trained_now, len(specs), cell, res))
        if on_cell is not None:
            on_cell(store.get(spec["key"]), res)

    with _sigterm_as_interrupt():
        try:
            ex.run(specs, on_start, on_done)
        except KeyboardInterrupt:
            result.interrupted = True
            log("[compare] stopped; run the same command again to continue (finished cells are kept)")


def _write_outputs(result: GridResult, rows: list[dict], g: Grid, out: Path) -> None:
    """The rows with their intervals, the analyses, results.{csv,json,md} and report.html."""
    result.failed = sum(r["status"] == "failed" for r in rows)
    result.not_applicable = sum(r["status"] == "n/a" for r in rows)
    result.rows = with_intervals(rows, g)
    result.analyses = analyse_grid(result.rows, g)
    result.files = write_exports(result.rows, out, result.summary)
    result.report = write_report(result.rows, out, g, result.analyses)
    result.files["html"] = result.report
    result.files["db"] = out / "results.db"


def describe_grid(grid: str | Path | dict | Grid) -> str:
    """Validate a grid (every cell's config included) without running or writing anything; its cells, one a line."""
    g = grid if isinstance(grid, Grid) else load_grid(grid)
    cells = resolve_cells(g, Path(g.output_dir), materialise=False)
    lines = [f"grid OK: {len(cells)} cells in {g.output_dir}"]
    for c in cells:
        what = c.note if c.config is None else c.mode
        lr = "" if c.config is None else f"  lr {c.sweep or c.config['training']['lr']}"
        lr = "  untrained" if c.role == "reference" else lr
        lines.append(f"  {c.label}: {what}{lr}  -> cells/{c.folder}")

    refs = references_for(g)
    lines.append(f"  references per classification / regression task: {', '.join(refs)}")
    if g.score_dtype != "as_loaded":
        lines.append(f"  scoring passes in {g.score_dtype} where the device has it natively (score_dtype)")
    return "\n".join(lines)


PLAN_FILE = "plan.json"


def write_plan(out: Path, g: Grid, cells: list[Cell]) -> None:
    """The keys of this run's rows in results.db, in grid order (references, then cells), for a reader watching the
    run (the web UI): planning again there would read every model's config and ask the hub for a hub id's commit."""
    refs = [reference_cell(kind, g, t).key for t in g.tasks if t.task_type in ("classification", "regression")
            for kind in references_for(g)]  # fmt: skip
    write_json_atomic(out / PLAN_FILE, {"keys": refs + [c.key for c in cells]})


def planned_keys(out: Path) -> list[str] | None:
    """The keys `write_plan` wrote in `out`, or None before the run planned its grid (or from a run before it)."""
    try:
        return list(json.loads((Path(out) / PLAN_FILE).read_text())["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _register(store: Store, cells: list[Cell], retry_failed: bool, result: GridResult, out: Path) -> list[Cell]:
    """Record every cell's identity; return those that must run (new, unfinished, or failed + retry)."""
    pending = []
    for c in cells:
        ident = plan_values(c)
        row = store.get(c.key)
        # the folder a cell was first given stays its folder (a renamed label does not orphan its run)
        ident["cell_dir"] = (row or {}).get("cell_dir") or str(out / "cells" / c.folder)
        if c.config is None:  # not applicable, or the model could not be read
            status = "n/a" if (c.note or "").startswith("not applicable") else "failed"
            store.upsert(c.key, status=status, error=c.note, **ident)
            continue
        if row is None:
            store.upsert(c.key, status="pending", **ident)
            pending.append(c)
            continue
        store.upsert(c.key, **ident)  # labels may have changed; the result has not
        if row["status"] == "done" or (row["status"] == "failed" and not retry_failed):
            result.skipped += 1
        else:
            pending.append(c)
    return pending


def _record_references(store: Store, g: Grid, out: Path, log, run: bool) -> list[str]:
    """Majority class (and, with `baselines: [tfidf]`, TF-IDF on the sample and on the whole train split)
    for every classification / regression task: fitted here, in a moment each. Their keys, in grid order."""
    keys = []
    for t in g.tasks:
        if t.task_type not in ("classification", "regression"):
            continue
        for kind in references_for(g):
            cell = reference_cell(kind, g, t)
            keys.append(cell.key)
            folder = reference_dir(out, kind, t, cell.key)
            ident = {**plan_values(cell), "cell_dir": str(folder)}
            row = store.get(cell.key)
            if row is not None and row["status"] == "done" and (folder / "predictions.jsonl").is_file():
                store.upsert(cell.key, **ident)
                continue
            if not run:
                continue
            try:
                res = run_reference(kind, g, t, folder)
            except Exception as e:  # noqa: BLE001 - recorded like a failed cell
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            store.upsert(cell.key, **{**ident, **result_values(res, cell.eval["main_metric"])})
            log(_reference_line(cell, res))
    return keys


def _reference_line(cell: Cell, res: dict) -> str:
    main = cell.eval["main_metric"]
    value = (res.get("metrics") or {}).get(main)
    shown = f"  {main}={fmt(value)} on {res['n']} rows" if value is not None else f"  {res.get('error')}"
    return f"[compare] reference {cell.method} × {cell.task}: {res['status']}{shown}"


def _with_references(rows: list[dict], references: list[dict], g: Grid) -> list[dict]:
    """Task by task (grid order): its references, then its cells (zero-shot, then model × method × seed)."""
    out = []
    for t in [t.shown for t in g.tasks]:
        out += [ref for ref in references if ref["task"] == t] + [r for r in rows if r["task"] == t]
    return out


def _progress_line(n: int, total: int, cell: Cell, res: dict) -> str:
    status = res.get("status")
    metric = cell.eval.get("main_metric")
    value = (res.get("metrics") or {}).get(metric)
    parts = [f"[{n}/{total}] {status:<11} {cell.label}"]
    if value is not None:
        parts.append(f"{metric}={fmt(value)}")
    if res.get("wall_s") is not None:
        parts.append(fmt_time(res.get("wall_s")))
    if res.get("peak_rss_mb"):
        parts.append(f"peak {res['peak_rss_mb']:.0f} MB")
    if res.get("resumed_from_step"):
        parts.append(f"resumed from step {res['resumed_from_step']}")
    if res.get("score_dtype_note"):  # score_dtype: bfloat16 where the device has no native bf16
        parts.append(res["score_dtype_note"])
    if status != "done" and res.get("error"):
        parts.append(str(res["error"]).splitlines()[0][:200])
    return "  ".join(parts)


class _sigterm_as_interrupt:
    """SIGTERM to the grid behaves like Ctrl-C (the running cell checkpoints), in the main thread."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
