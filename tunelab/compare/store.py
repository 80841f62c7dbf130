"""results.db (SQLite, one row per cell, JSON columns) and its exports: results.csv, .json and .md.

The columns are compare/record.py's COLUMNS. The database keeps every cell ever run in this folder (so
an edited grid reuses what still matches); the exports hold the rows of the current grid only, in grid
order, each task's references before its cells.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

from tunelab.compare.record import EXPORTED, STORED, export_rows, table_cells

JSON_COLUMNS = [c.name for c in STORED if c.name.endswith("_json")]  # held as JSON text, decoded on read


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path))
        self.db.row_factory = sqlite3.Row
        cols = ", ".join(f"{c.name} {c.sql}" for c in STORED)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS cells ({cols})")
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(cells)")}
        for c in STORED:  # a db from an older tunelab: add what is missing
            if c.name not in have:
                self.db.execute(f"ALTER TABLE cells ADD COLUMN {c.name} {c.sql.replace(' PRIMARY KEY', '')}")
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
        unknown = set(values) - {c.name for c in STORED}
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
    d["metrics"] = d.get("metrics_json") or {}  # the exported `metrics` column
    d["phases"] = d.get("phases_json") or {}  # and `phases`
    return d


# --------------------------------------------------------------------------------------- exports
def write_exports(rows: list[dict], out: Path, summary: str = "") -> dict[str, Path]:
    """results.csv, results.json, results.md (`summary`, then every row) in `out`; returns their paths."""
    data = export_rows(rows)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORTED, lineterminator="\n")
    w.writeheader()
    for r in data:
        w.writerow({k: _csv_value(v) for k, v in r.items()})
    _atomic(paths["csv"], buf.getvalue())
    _atomic(paths["json"], json.dumps(data, indent=2, default=str) + "\n")
    _atomic(paths["md"], (summary + "\n## Every row\n\n" if summary else "") + markdown_table(rows) + "\n")
    return paths


def _csv_value(v):
    """JSON text for a structured value (metrics), empty for a missing one."""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else v


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
