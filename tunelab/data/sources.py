"""`data.train` as one source or a list of them: files, hub ids, or names in a LLaMA-Factory
`dataset_info.json` registry, each with its own format and columns, mixed into one seeded set.

    rows = read_train(cfg.data, seed=0, stage="sft")   # (file, number, row) of every source, mixed
    source_config("data/alpaca_en_demo.json", cfg.data) # the DataConfig (format, columns) of that file's rows

`data.format: auto` is resolved per source from its registry entry or, else, from the columns of its
first row (`formats.detect_format`), and logged.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import DataConfig, DataSource
from tunelab.data.errors import DataError, where
from tunelab.data.formats import detect_format
from tunelab.data.readers import LOCAL_SUFFIXES, Row
from tunelab.data.tasks import read_source

log = logging.getLogger("tunelab.data")

# LLaMA-Factory's `columns` names -> tunelab's data.columns keys (per formatting and stage)
_LF_COLUMNS = {"query": "input", "response": "output", "messages": "messages", "system": "system",
               "tools": "tools", "chosen": "chosen", "rejected": "rejected"}  # fmt: skip
_LF_UNSUPPORTED = ("images", "videos", "audios")

# the DataConfig of each file read (format resolved, columns of its source), per data config: the rows
# stay plain (file, line, row) tuples, and a file read under another data config never sees these
_SOURCE_CFGS: dict[tuple[str, str], DataConfig] = {}


@dataclass
class Source:
    path: str
    cfg: DataConfig
    limit: int | None = None
    samples: int | None = None
    weight: float | None = None


def source_config(file: str, cfg: DataConfig) -> DataConfig:
    """The DataConfig (format, columns) of the rows read from `file`; `cfg` for a file read otherwise."""
    return _SOURCE_CFGS.get((file, cfg.model_dump_json()), cfg)


def _registry_path(cfg: DataConfig, name: str) -> Path | None:
    if cfg.dataset_info:
        p = Path(cfg.dataset_info).expanduser()
        p = p / "dataset_info.json" if p.is_dir() or not p.suffix else p
        if not p.is_file():
            raise DataError(f"data.dataset_info: {p} not found (a dataset_info.json, or the folder holding it)")
        return p
    default = Path("data") / "dataset_info.json"
    looks_like_file = Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name).expanduser().exists()
    return default if default.is_file() and not looks_like_file else None


def _registry(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the dataset registry ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: a dataset_info.json maps names to entries; got {type(info).__name__}")
    return info


def _from_registry(name: str, path: Path, cfg: DataConfig, stage: str) -> tuple[str, DataConfig]:
    info = _registry(path)
    entry = info.get(name)
    if not isinstance(entry, dict):
        import difflib

        near = difflib.get_close_matches(name, list(info), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise DataError(f"{path}: no data set named {name!r}.{hint}")
    at = f"{path} entry {name!r}"
    if entry.get("file_name"):
        source = str(path.parent / entry["file_name"])
    elif entry.get("hf_hub_url"):
        source = entry["hf_hub_url"]
    else:
        raise DataError(f"{at}: needs file_name or hf_hub_url (script and ModelScope entries are not read)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{at}: formatting {formatting!r} is not read; alpaca, sharegpt or openai")
    ranking = bool(entry.get("ranking"))
    fmt = "text" if stage in ("pretrain", "mlm") else "preference" if ranking else (
        "instruction" if formatting == "alpaca" else "chat")  # fmt: skip
    columns = dict(cfg.columns.model_dump())
    for theirs, col in (entry.get("columns") or {}).items():
        if theirs in _LF_UNSUPPORTED:
            raise DataError(f"{at}: column {theirs!r}: multimodal data sets are not supported")
        if theirs == "prompt":
            ours = "text" if fmt == "text" else "prompt" if ranking else "instruction"
        else:
            ours = _LF_COLUMNS.get(theirs)
        if ours:
            columns[ours] = col
    tags = entry.get("tags") or {}
    if (tags.get("role_tag", "from"), tags.get("content_tag", "value")) not in (("from", "value"), ("role", "content")):
        raise DataError(f"{at}: tags {tags}: messages are read as from/value or role/content")
    log.info("data: %s -> %s (format %s, from %s)", name, source, fmt, path)
    return source, cfg.model_copy(update={"format": fmt, "columns": type(cfg.columns)(**columns)})


def resolve(cfg: DataConfig, stage: str = "sft", entries=None) -> list[Source]:
    """The sources of `data.train` (or `entries`), each with its own DataConfig; registry names resolved."""
    entries = cfg.train if entries is None else entries
    if not entries:
        raise DataError("data.train is not set: give a .json/.jsonl/.csv/.tsv file, a hub dataset id or a list.")
    out = []
    for e in entries if isinstance(entries, list) else [entries]:
        spec = e if isinstance(e, DataSource) else DataSource(path=e)
        eff = cfg
        registry = _registry_path(cfg, spec.path)
        path = spec.path
        if registry is not None:
            path, eff = _from_registry(spec.path, registry, cfg, stage)
        if spec.format or spec.columns:
            cols = eff.columns.model_copy(update=spec.columns)
            eff = eff.model_copy(update={"format": spec.format or eff.format, "columns": cols})
        out.append(Source(path, eff, spec.limit, spec.samples, spec.weight))
    return out


def _mix(rows: list[Row], src: Source, seed: int) -> list[Row]:
    return [rows[i] for i in mix_indices(len(rows), src, seed)]


def split_rows(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle deterministically and hold out val_fraction (at least one row when possible). The shuffle
    depends on the number of rows alone, so rows and their positions are split alike."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return order[n_val:], order[:n_val]


def mix_indices(n_rows: int, src: Source, seed: int) -> list[int]:
    """Which of a source's `n_rows` rows (by position) go into the mix, in order: its limit, then `samples`
    or `weight` (whole copies plus a seeded sample, kept in file order when there is no whole copy).
    A function of the count alone, so a large source is mixed without its rows in memory."""
    rows = range(min(n_rows, src.limit) if src.limit is not None else n_rows)
    n = src.samples if src.samples else round(len(rows) * src.weight) if src.weight else None
    if n is None or not rows:
        return list(rows)
    rng = random.Random(f"{seed}:{src.path}")
    whole, rest = divmod(n, len(rows))
    # random.sample draws positions, so sampling the positions picks exactly the rows sampling the rows
    # would; the rows' numbers rise with their position, so sorting positions keeps file order
    picked = list(rows) * whole + rng.sample(rows, rest)
    return sorted(picked) if whole == 0 else picked


def read_all(cfg: DataConfig, seed: int, stage: str = "sft", entries=None, hub_split: str | None = None) -> list[Row]:
    """The rows of every source (limit / samples / weight applied), formats resolved and logged."""
    rows: list[Row] = []
    for src in resolve(cfg, stage, entries):
        part = read_source(src.path, hub_split=hub_split or cfg.hub_split, hub_config=cfg.hub_config)
        part = _mix(part, src, seed)
        eff = src.cfg
        if eff.format == "auto" and part:
            file, number, row = part[0]
            fmt = detect_format(row, eff, stage, where(file, number))
            log.info("data: %s: detected format %s", src.path, fmt)
            eff = eff.model_copy(update={"format": fmt})
        for file in {f for f, _, _ in part}:
            _SOURCE_CFGS[(file, cfg.model_dump_json())] = eff
        rows += part
    return rows
