"""The one error type of the data layer, and how rows are named in its messages."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable data. The message names the file, the line or row, the field, and the fix."""


_LINE_NUMBERED = (".jsonl", ".csv", ".tsv")


def where(file: str, number: int) -> str:
    """'data.jsonl line 7' for line-based files, 'alpaca.json row 3' for JSON lists and hub rows."""
    name = file[:-3] if file.endswith(".gz") else file
    unit = "line" if name.lower().endswith(_LINE_NUMBERED) else "row"
    return f"{file} {unit} {number}"
