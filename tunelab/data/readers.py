"""Rows from local files (.json, .jsonl, .csv, .tsv, each optionally .gz) or a `datasets` hub id.

Every row comes back as (file, number, row) so later errors can point at the exact place:
JSONL and CSV/TSV rows are numbered by file line (a CSV header is line 1), JSON list
elements and hub rows by position, counting from 1. `iter_rows` yields them one at a time
(JSONL and CSV/TSV are read as a stream, so a large file is never held whole); `read_rows` is its list.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from tunelab.data.errors import DataError

Row = tuple[str, int, dict]
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


def read_rows(source: str, *, hub_split: str = "train", hub_config: str | None = None) -> list[Row]:
    return list(iter_rows(source, hub_split=hub_split, hub_config=hub_config))


def iter_rows(source: str, *, hub_split: str = "train", hub_config: str | None = None) -> Iterator[Row]:
    """The rows of `source`, in order; a reading error is raised where the row it concerns would come."""
    path = Path(source).expanduser()
    suffix = _suffix(path)
    if path.is_file():
        readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv}
        if suffix == ".parquet":
            return _read_hub("parquet", source, "train", None, data_files=str(path))
        if suffix not in readers:
            raise DataError(
                f"{source}: unsupported file type {path.suffix!r}. Use .json (a list of objects), "
                ".jsonl, .csv or .tsv (optionally .gz), or .parquet."
            )
        return readers[suffix](source, path)
    if suffix in LOCAL_SUFFIXES:
        # Looks like a file name: a hub lookup would only add a slow, confusing network error.
        if path.is_dir():
            raise DataError(f"{source}: is a folder, not a data file; give the file itself in data.train/validation.")
        raise DataError(f"{source}: file not found (looked in {Path.cwd()}). Check the path in data.train/validation.")
    return _read_hub(source, source, hub_split, hub_config)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return Path(name).suffix


def _open(path: Path):
    # utf-8-sig: GLUE-style files start with a BOM that would otherwise end up in the first column name
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


class _Duplicated(dict):
    """An object read with a key given twice, or holding one that was: JSON parsers keep the last value
    without a word, so a row would silently lose a field the user wrote."""

    key = ""


def _object(pairs: list) -> dict:
    """json's object_pairs_hook: a dict, marked when a key repeats in it or in an object inside it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        marked = _Duplicated(obj)
        marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return marked
    for v in obj.values():
        for inner in v if isinstance(v, list) else (v,):
            if isinstance(inner, _Duplicated):
                marked = _Duplicated(obj)
                marked.key = inner.key
                return marked
    return obj


_JSON = json.JSONDecoder(object_pairs_hook=_object)  # one decoder: json.loads(hook=...) builds one per line


def _not_utf8(source: str, path: Path, e: UnicodeDecodeError) -> DataError:
    """The file line of the first byte that is not UTF-8 (the decoder's offset counts from its buffer)."""
    gz = path.name.lower().endswith(".gz")
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(
                    f"{source} line {n}: not UTF-8 text (byte 0x{raw[bad.start]:02x}); save the file as UTF-8."
                )
    return DataError(f"{source}: not UTF-8 text ({e.reason}); save the file as UTF-8.")


def _as_object(source: str, label: str, value) -> dict:
    if isinstance(value, _Duplicated):
        raise DataError(
            f"{source} {label}: key {value.key!r} appears twice in one object; JSON readers keep only the last "
            "value, so remove or rename the other."
        )
    if not isinstance(value, dict):
        raise DataError(
            f'{source} {label}: expected an object like {{"instruction": ..., "output": ...}}, '
            f"got {type(value).__name__}. Each row must be a JSON object."
        )
    return value


def _read_json(source: str, path: Path) -> Iterator[Row]:
    # a JSON list is parsed whole (the standard library has no incremental parser); use .jsonl for large sets
    try:
        with _open(path) as f:
            data = json.load(f, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{source} line {e.lineno}: not valid JSON ({e.msg}: column {e.colno}). Fix the file."
        ) from None
    except RecursionError:
        raise DataError(f"{source}: nested too deeply to read as JSON. Rows must be flat objects.") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(source, path, e) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: cannot read the file ({e}).") from None
    if not isinstance(data, list):
        hint = " Did you mean .jsonl (one object per line)?" if isinstance(data, dict) else ""
        raise DataError(f"{source}: a .json file must hold a list of objects, got {type(data).__name__}.{hint}")
    return ((source, i, _as_object(source, f"row {i}", row)) for i, row in enumerate(data, 1))


def _read_jsonl(source: str, path: Path) -> Iterator[Row]:
    try:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = _JSON.decode(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{source} line {n}: not valid JSON ({e.msg}: column {e.colno}). Fix or remove that line."
                    ) from None
                except RecursionError:
                    raise DataError(
                        f"{source} line {n}: nested too deeply to read as JSON. Rows must be flat objects."
                    ) from None
                yield source, n, _as_object(source, f"line {n}", value)
    except UnicodeDecodeError as e:
        raise _not_utf8(source, path, e) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: cannot read the file ({e}).") from None


def _read_csv(source: str, path: Path) -> Iterator[Row]:
    csv.field_size_limit(sys.maxsize)  # long responses exceed the 128 KiB default
    delimiter = "\t" if _suffix(path) == ".tsv" else ","
    try:
        with _open(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise DataError(f"{source}: empty file; the first line must name the columns.")
            start = reader.line_num + 1
            for values in reader:
                if values:
                    if len(values) != len(header):
                        raise DataError(
                            f"{source} line {start}: {len(values)} fields, but the header has {len(header)}. "
                            "Quote fields that contain the delimiter or line breaks."
                        )
                    yield source, start, dict(zip(header, values))
                start = reader.line_num + 1  # a quoted field may span several lines
    except UnicodeDecodeError as e:
        raise _not_utf8(source, path, e) from None
    except (OSError, EOFError, zlib.error, csv.Error) as e:
        raise DataError(f"{source}: cannot read the file ({e}).") from None


def _read_hub(name: str, source: str, split: str, config: str | None, **kwargs) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, name=config, split=split, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        if kwargs:
            raise DataError(f"{source}: cannot read the file ({e}).") from None
        raise DataError(
            f"{source}: not found as a local file (looked in {Path.cwd()}), and loading it as a Hugging Face "
            f"hub dataset (split {split!r}) failed: {type(e).__name__}: {e}. Check the path, or the hub id "
            "and your network (offline: download it first and point data.train at the files)."
        ) from None
    label = source if kwargs else f"{source}[{split}]"
    return ((label, i, dict(row)) for i, row in enumerate(ds, 1))
