"""`data.train` as one source or a list of them: files, hub ids, or names in a LLaMA-Factory
`dataset_info.json` registry, each with its own format and columns, mixed into one seeded set.

    rows, configs = read_sources(cfg.data, seed=0, stage="sft")  # (file, number, row) of every source, mixed
    configs["data/alpaca_en_demo.json"]                          # the DataConfig (format, columns) of its rows
    key = reading_key(cfg.data, seed=0, stage="sft")              # changes when a file behind the rows does

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
# LLaMA-Factory's role tags -> the role (data.roles) their value names
_LF_ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system",
                 "observation_tag": "tool", "function_tag": "function_call"}  # fmt: skip


@dataclass
class Source:
    path: str
    cfg: DataConfig
    limit: int | None = None
    samples: int | None = None
    weight: float | None = None
    split: str | None = None


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


def _from_registry(name: str, path: Path, cfg: DataConfig, stage: str, quiet: bool = False) -> tuple[str, DataConfig]:
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
    fmt = "text" if stage in ("pretrain", "mlm") else "preference" if ranking or stage == "kto" else (
        "instruction" if formatting == "alpaca" else "chat")  # fmt: skip
    columns = dict(cfg.columns.model_dump())
    for theirs, col in (entry.get("columns") or {}).items():
        if theirs in _LF_UNSUPPORTED:
            raise DataError(f"{at}: column {theirs!r}: multimodal data sets are not supported")
        if theirs == "kto_tag" and stage != "kto":
            raise DataError(f"{at}: column 'kto_tag': KTO data (one reply per row, labelled good or bad) trains "
                            "stage kto; pairs of replies (ranking: true, chosen / rejected) train with stage dpo "
                            "or reward")  # fmt: skip
        if theirs == "kto_tag":
            ours = "label"
        elif theirs == "prompt":
            ours = "text" if fmt == "text" else "prompt" if ranking or stage == "kto" else "instruction"
        else:
            ours = _LF_COLUMNS.get(theirs)
        if ours:
            columns[ours] = col
    # tags: the keys of a message (role_tag, content_tag) and its role names (user_tag ...), when not the usual
    tags = entry.get("tags") or {}
    unknown = sorted(set(tags) - {"role_tag", "content_tag", *_LF_ROLE_TAGS})
    if unknown:
        raise DataError(f"{at}: tags {unknown} are not read; known: role_tag, content_tag, {', '.join(_LF_ROLE_TAGS)}")
    columns.update({ours: tags[t] for t, ours in (("role_tag", "role"), ("content_tag", "content")) if tags.get(t)})
    roles = {**cfg.roles, **{tags[t]: ours for t, ours in _LF_ROLE_TAGS.items() if tags.get(t)}}
    if not quiet:
        log.info("data: %s -> %s (format %s, from %s)", name, source, fmt, path)
    return source, cfg.model_copy(update={"format": fmt, "columns": type(cfg.columns)(**columns), "roles": roles})


def resolve(cfg: DataConfig, stage: str = "sft", entries=None, quiet: bool = False) -> list[Source]:
    """The sources of `data.train` (or `entries`), each with its own DataConfig; registry names resolved
    (and logged unless `quiet`)."""
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
            path, eff = _from_registry(spec.path, registry, cfg, stage, quiet)
        if spec.format or spec.columns or spec.roles:
            cols = eff.columns.model_copy(update=spec.columns)
            roles = {**eff.roles, **spec.roles}
            eff = eff.model_copy(update={"format": spec.format or eff.format, "columns": cols, "roles": roles})
        out.append(Source(path, eff, spec.limit, spec.samples, spec.weight, spec.split))
    return out


def _mix(rows: list[Row], src: Source, seed: int) -> list[Row]:
    return [rows[i] for i in mix_indices(len(rows), src, seed)]


def split_rows(rows: list, val_fraction: float, seed: int, max_val: int | None = None) -> tuple[list, list]:
    """Shuffle deterministically and hold out val_fraction (at least one row when possible), at most `max_val`
    rows (data.val_max_rows; the rest of the fraction trains). The shuffle depends on the number of rows alone,
    so rows and their positions are split alike."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
        if max_val is not None and n_val > max_val:
            log.info("data: validation capped at data.val_max_rows = %d rows (val_fraction %g of %d rows is %d; "
                     "the other %d train)", max_val, val_fraction, len(order), n_val, n_val - max_val)  # fmt: skip
            n_val = max_val
    return order[n_val:], order[:n_val]


def cap_validation(rows: list, max_val: int | None, seed: int) -> list:
    """A validation file's rows, or a seeded sample of `max_val` of them (data.val_max_rows) kept in file order;
    like split_rows, a function of the number of rows alone."""
    if max_val is None or len(rows) <= max_val:
        return rows
    log.info("data: validation capped at data.val_max_rows = %d of its %d rows (a seeded sample)", max_val, len(rows))
    keep = sorted(random.Random(f"{seed}:validation").sample(range(len(rows)), max_val))
    return [rows[i] for i in keep]


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


def source_rows(src: Source, hub_split: str, hub_config: str | None) -> list[Row]:
    """The rows of one source: a hub id's split (the source's own `split`, slice included, else
    `hub_split`), or a local file's rows, sliced by the source's `split` as `datasets` reads one."""
    local = Path(src.path).expanduser().is_file()
    split = src.split if src.split and not local else hub_split
    rows = read_source(src.path, hub_split=split, hub_config=hub_config)
    if not (src.split and local):
        return rows
    from datasets import ReadInstruction  # datasets' own split grammar (train[:10%], train[10:20]+train[-5:])

    try:
        parts = ReadInstruction.from_spec(src.split).to_absolute({"train": len(rows)})
    except (ValueError, AssertionError) as e:
        raise DataError(f"{src.path}: split {src.split!r}: {e}. A local file is one split, train: "
                        "e.g. train[:10%], train[100:]") from None  # fmt: skip
    return [r for a in parts for r in rows[a.from_ : a.to]]


def read_sources(cfg: DataConfig, seed: int, stage: str = "sft", entries=None,
                 hub_split: str | None = None) -> tuple[list[Row], dict[str, DataConfig]]:  # fmt: skip
    """(rows, configs): the rows of every source (limit / samples / weight applied) and, per file they came
    from, the DataConfig they are read with (format resolved and logged, the source's own columns). The
    rows stay plain (file, line, row) tuples; `configs` travels beside them to whoever converts them."""
    rows: list[Row] = []
    configs: dict[str, DataConfig] = {}
    for src in resolve(cfg, stage, entries):
        part = _mix(source_rows(src, hub_split or cfg.hub_split, cfg.hub_config), src, seed)
        eff = src.cfg
        if eff.format == "auto" and part:
            file, number, row = part[0]
            fmt = detect_format(row, eff, stage, where(file, number))
            log.info("data: %s: detected format %s", src.path, fmt)
            eff = eff.model_copy(update={"format": fmt})
        for file in {f for f, _, _ in part}:
            if configs.setdefault(file, eff) != eff:  # rows name their file only: one reading per file
                raise DataError(f"data.train lists {file} twice with different formats or columns; give it once")
        rows += part
    return rows, configs


def _stat(source: str) -> tuple:
    p = Path(source).expanduser()
    if not p.is_file():  # a hub id (its cache is the hub library's business) or a registry that is absent
        return (source,)
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def reading_key(cfg: DataConfig, seed: int, stage: str) -> tuple:
    """What a reading of `cfg`'s data depends on: the settings, the seed, the stage, and the path, mtime and
    size of every file behind it (the sources and the dataset_info.json that resolved their names). A
    reading kept under this key for a later step of the same run is reused only while nothing changed."""
    files = []
    for entries in (cfg.train, cfg.validation):
        for e in entries if isinstance(entries, list) else [entries] if entries else []:
            registry = _registry_path(cfg, e.path if isinstance(e, DataSource) else e)
            files += [str(registry)] if registry is not None else []
        files += [src.path for src in resolve(cfg, stage, entries, quiet=True)] if entries else []
    return (cfg.model_dump_json(), seed, stage, str(Path.cwd()), tuple(_stat(f) for f in files))
