"""The one error type of the data layer, and how rows are named in its messages."""

from __future__ import annotations

import logging

log = logging.getLogger("tunelab.data")


class DataError(ValueError):
    """Unusable data. The message names the file, the line or row, the field, and the fix."""


_LINE_NUMBERED = (".jsonl", ".csv", ".tsv")


def where(file: str, number: int) -> str:
    """'data.jsonl line 7' for line-based files, 'alpaca.json row 3' for JSON lists and hub rows."""
    name = file[:-3] if file.endswith(".gz") else file
    unit = "line" if name.lower().endswith(_LINE_NUMBERED) else "row"
    return f"{file} {unit} {number}"


def source_names(train) -> str:
    """data.train in a message: the file, or the list of sources."""
    if isinstance(train, list):
        return ", ".join(t if isinstance(t, str) else t.path for t in train)
    return str(train)


def check_kept(cfg, train_rows: int, dropped: int) -> None:
    """After truncation to data.max_length (in memory or in the store): no training example left is an error,
    dropped rows a warning; both name the fix."""
    if not train_rows:
        raise DataError(
            f"{source_names(cfg.train)}: no training example has response tokens left after truncation to "
            f"data.max_length={cfg.max_length}. Raise data.max_length."
        )
    if dropped:
        log.warning(
            "%d rows dropped: their response starts after data.max_length=%d tokens. "
            "Raise data.max_length to keep them.",
            dropped, cfg.max_length,
        )  # fmt: skip
