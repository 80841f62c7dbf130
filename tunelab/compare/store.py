"""results.db (SQLite, one row per cell, JSON columns) and its exports: results.csv, .json and .md.

The database keeps every cell ever run in this folder (so an edited grid reuses what still matches);
the exports hold the rows of the current grid only, in grid order, baselines after each task's cells.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

COLUMNS = {  # name -> SQL type; *_json columns hold JSON text
    "key": "TEXT PRIMARY KEY",
    "model": "TEXT",
    "method": "TEXT",
    "task": "TEXT",
    "model_name": "TEXT",
    "method_name": "TEXT",
    "task_name": "TEXT",
    "kind": "TEXT",  # causal | encoder | baseline
    "role": "TEXT",  # method | reference (majority, tfidf, tfidf-full, zero-shot)
    "seed": "INTEGER",  # training seed (None for references)
    "mode": "TEXT",  # head | verbalizer | perplexity | tfidf | n/a
    "status": "TEXT",  # pending | running | done | failed | interrupted | n/a
    "error": "TEXT",
    "main_metric": "TEXT",
    "main_value": "REAL",
    "n": "INTEGER",  # dev rows scored
    "metrics_json": "TEXT",
    "train_json": "TEXT",
    "trainable_params": "INTEGER",
    "total_params": "INTEGER",
    "trainable_pct": "REAL",
    "peak_rss_mb": "REAL",
    "cuda_peak_mb": "REAL",
    "wall_s": "REAL",
    "tokens_per_s": "REAL",
    "size_mb": "REAL",
    "weights_mb": "REAL",
    "train_loss": "REAL",
    "eval_loss": "REAL",
    "attempts": "INTEGER",
    "resumed_from_step": "INTEGER",
    "cell_dir": "TEXT",  # the cell's folder (predictions.jsonl, result.json, log.txt)
    "run_dir": "TEXT",  # the run that was scored
    "chosen_lr": "REAL",  # the learning rate a sweep chose on the validation rows
    "sweep_json": "TEXT",
    "config_json": "TEXT",
    "eval_json": "TEXT",
    "curve_json": "TEXT",
    "updated_at": "REAL",
}
JSON_COLUMNS = [c for c in COLUMNS if c.endswith("_json")]
# exported (csv/json) columns, in order; JSON columns are exported decoded (json) or as JSON text (csv)
EXPORT = [
    "model",
    "method",
    "task",
    "status",
    "main_metric",
    "main_value",
    "ci_low",
    "ci_high",
    "n",
    "seed",
    "role",
    "chosen_lr",
    "metrics",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "peak_rss_mb",
    "cuda_peak_mb",
    "wall_s",
    "tokens_per_s",
    "size_mb",
    "weights_mb",
    "train_loss",
    "eval_loss",
    "error",
    "kind",
    "mode",
    "cell_dir",
    "run_dir",
    "key",
]
METRIC_ORDER = ["accuracy", "f1", "precision", "recall", "mcc", "pearson", "spearman", "perplexity", "loss"]


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path))
        self.db.row_factory = sqlite3.Row
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        self.db.execute(f"CREATE TABLE IF NOT EXISTS cells ({cols})")
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(cells)")}
        for k, v in COLUMNS.items():  # a db from an older tunelab: add what is missing
            if k not in have:
                self.db.execute(f"ALTER TABLE cells ADD COLUMN {k} {v.replace(' PRIMARY KEY', '')}")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT * FROM cells WHERE key = ?", (key,)).fetchone()
        return _decode(row) if row else None

    def upsert(self, key: str, **values) -> None:
        values = {
            k: (json.dumps(v, default=str) if k in JSON_COLUMNS and v is not None else v) for k, v in values.items()
        }
        values["updated_at"] = time.time()
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown result columns {sorted(unknown)}")
        if self.get(key) is None:
            cols = ["key", *values]
            self.db.execute(
                f"INSERT INTO cells ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [key, *values.values()]
            )
        else:
            sets = ", ".join(f"{k} = ?" for k in values)
            self.db.execute(f"UPDATE cells SET {sets} WHERE key = ?", [*values.values(), key])
        self.db.commit()

    def rows(self, keys: list[str]) -> list[dict]:
        out = []
        for k in keys:
            r = self.get(k)
            if r is not None:
                out.append(r)
        return out


def _decode(row: sqlite3.Row) -> dict:
    d = dict(row)
    for c in JSON_COLUMNS:
        d[c] = json.loads(d[c]) if d.get(c) else None
    d["metrics"] = d.get("metrics_json") or {}
    return d


def result_values(result: dict, main_metric: str | None) -> dict:
    """Columns from a cell's result.json (see cell.py)."""
    train = result.get("train") or {}
    metrics = result.get("metrics") or {}
    trainable, total = train.get("trainable_params"), train.get("total_params")
    return {
        "status": result.get("status"),
        "error": result.get("error"),
        "main_metric": main_metric,
        "main_value": metrics.get(main_metric) if main_metric else None,
        "n": result.get("n"),
        "metrics_json": metrics,
        "train_json": train,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": round(100.0 * trainable / total, 6) if trainable and total else None,
        "peak_rss_mb": result.get("peak_rss_mb"),
        "cuda_peak_mb": result.get("cuda_peak_mb"),
        "wall_s": result.get("wall_s_total", result.get("wall_s")),
        "tokens_per_s": train.get("tokens_per_s"),
        "size_mb": result.get("size_mb"),
        "weights_mb": result.get("weights_mb"),
        "train_loss": train.get("train_loss"),
        "eval_loss": train.get("eval_loss"),
        "attempts": result.get("attempt"),
        "resumed_from_step": result.get("resumed_from_step"),
        "curve_json": result.get("curve"),
        "run_dir": result.get("run_dir"),
        "chosen_lr": (result.get("chosen") or {}).get("lr"),
        "sweep_json": result.get("sweep"),
    }


# --------------------------------------------------------------------------------------- exports
def export_rows(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in EXPORT} for r in rows]


def write_exports(rows: list[dict], out: Path, summary: str = "") -> dict[str, Path]:
    """results.csv, results.json, results.md (`summary`, then every row) in `out`; returns their paths."""
    data = export_rows(rows)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT, lineterminator="\n")
    w.writeheader()
    for r in data:
        w.writerow({k: json.dumps(v) if k == "metrics" else ("" if v is None else v) for k, v in r.items()})
    _atomic(paths["csv"], buf.getvalue())
    _atomic(paths["json"], json.dumps(data, indent=2, default=str) + "\n")
    _atomic(paths["md"], (summary + "\n## Every row\n\n" if summary else "") + markdown_table(rows) + "\n")
    return paths


def metric_columns(rows: list[dict]) -> list[str]:
    seen = {k for r in rows for k in (r.get("metrics") or {})}
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER) - {"tokens"})


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


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The results table as strings (shared by results.md and report.html)."""
    metrics = metric_columns(rows)
    header = [
        "Model",
        "Method",
        "Task",
        "Seed",
        "Status",
        "n",
        *metrics,
        "95% CI",
        "lr",
        "Train loss",
        "Val loss",
        "Trainable",
        "Trainable %",
        "Peak MB",
        "Tokens/s",
        "Saved MB",
        "Time",
        "Folder",
    ]
    body = []
    for r in rows:
        m = r.get("metrics") or {}
        ci = f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r.get("ci_low") is not None else "—"
        lr = r.get("chosen_lr") or ((r.get("config_json") or {}).get("training") or {}).get("lr")
        trains = r.get("role") != "reference"
        body.append(
            [
                r.get("model") or "",
                r.get("method") or "",
                r.get("task") or "",
                "—" if r.get("seed") is None else str(r["seed"]),
                r.get("status") or "",
                "—" if r.get("n") is None else str(r["n"]),
                *[fmt(m.get(k)) for k in metrics],
                ci,
                (f"{lr:g}" + (" (chosen)" if r.get("chosen_lr") else "")) if lr and trains else "—",
                fmt(r.get("train_loss")),
                fmt(r.get("eval_loss")),
                fmt_params(r.get("trainable_params")),
                fmt_pct(r.get("trainable_pct")),
                fmt(r.get("peak_rss_mb"), 0),
                fmt(r.get("tokens_per_s"), 0),
                fmt(r.get("size_mb"), 2),
                fmt_time(r.get("wall_s")),
                Path(r["cell_dir"]).name if r.get("cell_dir") else "",
            ]
        )
    return header, body


def markdown_table(rows: list[dict]) -> str:
    header, body = table_cells(rows)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    failed = [r for r in rows if r.get("status") in ("failed", "n/a", "interrupted") and r.get("error")]
    if failed:
        lines += ["", "Not finished:", ""]
        lines += [f"- {r['model']} × {r['method']} × {r['task']}: {r['status']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
