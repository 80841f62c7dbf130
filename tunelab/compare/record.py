"""One compare row, defined once: COLUMNS, every column a cell's or a reference's row has, in order.

Each Column says where its value comes from (the planned cell, or the result a cell or reference
returns), how results.db stores it, whether results.csv / results.json export it and how the results
table (results.md, report.html) shows it. The store's schema and exports, the rows run.py records and
the table are all built from COLUMNS: adding a column is one line here.

The one order serves the exports and the table alike: shown columns appear in the table in this order,
exported ones in results.csv / results.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

METRIC_ORDER = ["accuracy", "f1", "precision", "recall", "mcc", "pearson", "spearman", "perplexity", "loss"]


# ------------------------------------------------------------------------------------ formatting
def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def fmt_pct(v) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v >= 0.01 else f"{v:.2g}"


def fmt_params(n) -> str:
    if not n:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def fmt_time(s) -> str:
    if s is None:
        return "—"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def _text(v) -> str:
    return "" if v is None else str(v)


def _count(v) -> str:
    return "—" if v is None else str(v)


def _folder(path) -> str:
    return Path(path).name if path else ""


def _ci(row: dict) -> str:
    return f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]" if row.get("ci_low") is not None else "—"


def _lr(row: dict) -> str:
    """The learning rate trained with (a sweep's choice, else the config's); none for a reference."""
    lr = row.get("chosen_lr") or ((row.get("config_json") or {}).get("training") or {}).get("lr")
    if not lr or row.get("role") == "reference":
        return "—"
    return f"{lr:g}" + (" (chosen)" if row.get("chosen_lr") else "")


# ---------------------------------------------------------------------------- reading a result
def _at(path: str) -> Callable[[dict], Any]:
    """A getter of `path` ("train.tokens_per_s") in a result dict; None where a part is missing."""

    def get(d: dict):
        for part in path.split("."):
            d = (d or {}).get(part)
        return d

    return get


def _main_value(result: dict):
    main = result.get("main_metric")
    return (result.get("metrics") or {}).get(main) if main else None


def training_share(row: dict) -> float | None:
    """The fraction of a cell's wall time spent in optimizer steps (its `phases`, cell.py), or None."""
    phases = row.get("phases") or {}
    wall = sum(phases.values())
    return phases.get("training", 0.0) / wall if phases and wall > 0 else None


def _train_share(row: dict) -> str:
    share = training_share(row)
    return "—" if share is None else f"{100 * share:.0f}%"


def _trainable_pct(result: dict):
    train = result.get("train") or {}
    trainable, total = train.get("trainable_params"), train.get("total_params")
    return round(100.0 * trainable / total, 6) if trainable and total else None


# ------------------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Column:
    """One column of a compare row: where its value comes from, and how each output keeps and shows it."""

    name: str
    sql: str | None = None  # SQLite type in results.db; None: computed when the outputs are written
    header: str | None = None  # its column in the results table; None: not shown
    show: Callable[[Any], str] = _text  # the value -> the table's text
    show_row: Callable[[dict], str] | None = None  # a table cell that reads several columns of the row
    per_metric: bool = False  # shown as one table column per metric the rows have
    plan: Callable[[Any], Any] | None = None  # the planned Cell -> the value, recorded before it runs
    result: Callable[[dict], Any] | None = None  # the result (cell.py's result.json, a reference's) -> the value
    export: bool = True  # in results.csv / results.json

    def text(self, row: dict) -> str:
        return self.show_row(row) if self.show_row else self.show(row.get(self.name))


COLUMNS: tuple[Column, ...] = (
    Column("model", "TEXT", "Model", plan=attrgetter("model")),  # shown labels
    Column("method", "TEXT", "Method", plan=attrgetter("method")),
    Column("task", "TEXT", "Task", plan=attrgetter("task")),
    Column("seed", "INTEGER", "Seed", _count, plan=attrgetter("seed")),  # training seed; None for references
    Column("role", "TEXT", plan=attrgetter("role")),  # method | reference (majority, tfidf, tfidf-full, zero-shot)
    Column("status", "TEXT", "Status", result=_at("status")),  # pending | running | done | failed | interrupted | n/a
    Column("main_metric", "TEXT", plan=lambda c: c.eval.get("main_metric"), result=_at("main_metric")),
    Column("main_value", "REAL", result=_main_value),
    Column("n", "INTEGER", "n", _count, result=_at("n")),  # dev rows scored
    Column("metrics", None, per_metric=True),  # metrics_json, decoded
    Column("ci_low", None, "95% CI", show_row=_ci),  # from the predictions (report.with_intervals)
    Column("ci_high", None),
    Column("chosen_lr", "REAL", "lr", show_row=_lr, result=_at("chosen.lr")),  # a sweep's pick on the val rows
    Column("train_loss", "REAL", "Train loss", fmt, result=_at("train.train_loss")),
    Column("eval_loss", "REAL", "Val loss", fmt, result=_at("train.eval_loss")),
    Column("trainable_params", "INTEGER", "Trainable", fmt_params, result=_at("train.trainable_params")),
    Column("total_params", "INTEGER", result=_at("train.total_params")),
    Column("trainable_pct", "REAL", "Trainable %", fmt_pct, result=_trainable_pct),
    Column("peak_rss_mb", "REAL", "Peak MB", partial(fmt, digits=0), result=_at("peak_rss_mb")),
    Column("cuda_peak_mb", "REAL", result=_at("cuda_peak_mb")),
    Column("tokens_per_s", "REAL", "Tokens/s", partial(fmt, digits=0), result=_at("train.tokens_per_s")),
    Column("size_mb", "REAL", "Saved MB", partial(fmt, digits=2), result=_at("size_mb")),
    Column("weights_mb", "REAL", result=_at("weights_mb")),
    # every attempt's seconds when a cell resumed (cell.py), else this one's (a reference's)
    Column("wall_s", "REAL", "Time", fmt_time, result=lambda r: r.get("wall_s_total", r.get("wall_s"))),
    # the last attempt's wall time by phase (startup, loading, training, scoring, saving, other, exit; cell.py)
    Column("phases", None, "Training %", show_row=_train_share),  # phases_json, decoded
    Column("error", "TEXT", result=_at("error")),
    Column("kind", "TEXT", plan=attrgetter("kind")),  # causal | encoder | baseline
    Column("mode", "TEXT", plan=attrgetter("mode")),  # head | verbalizer | perplexity | majority | tfidf ... | n/a
    Column("cell_dir", "TEXT", "Folder", _folder),  # predictions.jsonl, result.json, log.txt; set by run.py
    Column("run_dir", "TEXT", result=_at("run_dir")),  # the run that was scored
    Column("score_dtype", "TEXT", result=_at("score_dtype")),  # the precision of the scoring passes (cell.py)
    Column("model_commit", "TEXT", result=_at("train.base_commit")),  # a hub id's commit the cell loaded
    Column("key", "TEXT PRIMARY KEY"),
    # in results.db only; *_json columns hold JSON text
    Column("model_name", "TEXT", export=False, plan=attrgetter("model_name")),
    Column("method_name", "TEXT", export=False, plan=attrgetter("method_name")),
    Column("task_name", "TEXT", export=False, plan=attrgetter("task_name")),
    Column("metrics_json", "TEXT", export=False, result=lambda r: r.get("metrics") or {}),
    Column("train_json", "TEXT", export=False, result=lambda r: r.get("train") or {}),
    Column("attempts", "INTEGER", export=False, result=_at("attempt")),
    Column("resumed_from_step", "INTEGER", export=False, result=_at("resumed_from_step")),
    Column("sweep_json", "TEXT", export=False, result=_at("sweep")),  # each learning rate's validation metrics
    Column("config_json", "TEXT", export=False, plan=attrgetter("config")),
    Column("eval_json", "TEXT", export=False, plan=attrgetter("eval")),
    Column("curve_json", "TEXT", export=False, result=_at("curve")),
    Column("phases_json", "TEXT", export=False, result=_at("phases")),
    Column("updated_at", "REAL", export=False),  # set by Store.upsert
)
STORED = tuple(c for c in COLUMNS if c.sql)
EXPORTED = [c.name for c in COLUMNS if c.export]


# ---------------------------------------------------------------------------------------- rows
def plan_values(cell) -> dict:
    """The columns a planned cell or reference (plan.Cell) fixes before anything runs."""
    return {c.name: c.plan(cell) for c in COLUMNS if c.plan}


def result_values(result: dict, main_metric: str | None) -> dict:
    """The columns a result fills: a cell's result.json (see cell.py) or a reference's (references.py)."""
    source = {**result, "main_metric": main_metric}  # the result does not name its main metric; the plan does
    return {c.name: c.result(source) for c in COLUMNS if c.result}


def export_rows(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in EXPORTED} for r in rows]


# --------------------------------------------------------------------------------------- table
def metric_columns(rows: list[dict]) -> list[str]:
    seen = {k for r in rows for k in (r.get("metrics") or {})}
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER) - {"tokens"})


def _metric_text(name: str) -> Callable[[dict], str]:
    return lambda row: fmt((row.get("metrics") or {}).get(name))


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The results table as strings (shared by results.md and report.html)."""
    shown: list[tuple[str, Callable[[dict], str]]] = []
    for c in COLUMNS:
        if c.per_metric:
            shown += [(m, _metric_text(m)) for m in metric_columns(rows)]
        elif c.header:
            shown.append((c.header, c.text))
    return [h for h, _ in shown], [[text(r) for _, text in shown] for r in rows]
