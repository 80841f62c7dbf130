"""DataConfig -> tokenized train/val examples: read, split, tokenize, truncate, pack."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tunelab.config import DataConfig
from tunelab.data import store
from tunelab.data.errors import DataError, check_kept, source_names, where
from tunelab.data.formats import row_to_messages, row_to_text
from tunelab.data.packing import pack
from tunelab.data.readers import Row
from tunelab.data.sources import cap_validation, read_sources, reading_key, split_rows
from tunelab.data.templating import IGNORE, render_examples

log = logging.getLogger("tunelab.data")


@dataclass
class DataBundle:
    # {"input_ids": [...], "labels": [...]} (+ "position_ids" when packed): lists, or for a large data set
    # store.ArrowExamples, which index and slice alike and read each example from the on-disk cache
    train: list[dict]
    val: list[dict]
    stats: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # the store's: hit, folders, seconds ({} in memory)


def read_split(cfg: DataConfig, seed: int, stage: str = "sft") -> tuple[list[Row], list[Row], int, dict]:
    """(train rows, validation rows, rows read, the DataConfig of each file): `data.validation` when set,
    else the `val_fraction` of `data.train` held out with `seed`. The one place that decides which rows a
    run never trains on."""
    if not cfg.train:
        raise DataError("data.train is not set: give a .json/.jsonl/.csv/.tsv file or a hub dataset id.")
    rows, configs = read_sources(cfg, seed, stage)
    rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"{source_names(cfg.train)}: no rows to train on.")
    if not cfg.validation:
        train_rows, val_rows = split_rows(rows, cfg.val_fraction, seed, cfg.val_max_rows)
        return train_rows, val_rows, len(rows), configs
    # the same hub id for both: take its "validation" split rather than train twice
    split = "validation" if cfg.validation == cfg.train else cfg.hub_split
    val_rows, val_configs = read_sources(cfg, seed, stage, entries=[cfg.validation], hub_split=split)
    train_rows, _ = split_rows(rows, 0.0, seed)
    val_rows = cap_validation(val_rows, cfg.val_max_rows, seed)
    return train_rows, val_rows, len(rows) + len(val_rows), configs | val_configs


# check_rows' reading, kept for the build_datasets call that follows it (one entry: the run being started),
# under reading_key: a changed file, setting or folder makes it a miss, never a stale hit
_CHECKED: dict = {}


def check_rows(cfg: DataConfig, seed: int, stage: str = "sft") -> None:
    """Read the rows and map each to messages (or text), without a tokenizer: a bad file is reported before
    the model loads (minutes, for a large one) rather than after. The next build_datasets with the same
    settings takes these rows instead of reading the files again."""
    if stage == "pretrain" and cfg.format not in ("text", "auto"):
        raise DataError("stage: pretrain trains on raw text; set data.format: text.")
    if store.uses_store(cfg, stage):  # a large data set: checked as it is read into the on-disk cache
        store.check(cfg, seed, stage)
        return
    split = read_split(cfg, seed, stage)
    train_rows, val_rows, _, configs = split
    for file, number, row in train_rows + val_rows:
        c = configs.get(file, cfg)
        to_model_input = row_to_text if c.format == "text" else row_to_messages
        to_model_input(row, c, where(file, number))
    _CHECKED.clear()
    _CHECKED[reading_key(cfg, seed, stage)] = split


def build_datasets(
    cfg: DataConfig, tokenizer, seed: int, stage: str = "sft", fingerprint: str | None = None
) -> DataBundle:
    """The examples of `cfg`. `tokenizer`: the tokenizer, or a function of no arguments that loads it, called
    only when rows are to be tokenised (so a hit of the store's cache loads none when `fingerprint`, what
    decides the token ids, e.g. models.tokenizer_digest(cfg.model), is given)."""
    if stage == "pretrain" and cfg.format not in ("text", "auto"):
        raise DataError("stage: pretrain trains on raw text; set data.format: text.")
    if store.uses_store(cfg, stage):
        train, val, stats, cache = store.prepare(cfg, tokenizer, seed, stage, fingerprint)
        return DataBundle(train=train, val=val, stats=stats, cache=cache)
    if store.is_loader(tokenizer):
        tokenizer = tokenizer()
    checked = _CHECKED.pop(reading_key(cfg, seed, stage), None)
    train_rows, val_rows, rows_read, configs = checked or read_split(cfg, seed, stage)
    counts = {"truncated": 0, "dropped": 0}
    train = _encode_all(train_rows, configs, cfg, tokenizer, counts)
    val = _encode_all(val_rows, configs, cfg, tokenizer, counts)
    check_kept(cfg, len(train), counts["dropped"])
    stats = {
        "rows_read": rows_read,
        "train_rows": len(train),
        "val_rows": len(val),
        **counts,
        "tokens": sum(len(e["input_ids"]) for e in train),
        "label_tokens": sum(sum(t != IGNORE for t in e["labels"]) for e in train),
    }
    if cfg.packing:
        # only train is packed: eval losses are the same either way, and per-example val rows stay simple
        train = pack(train, cfg.max_length)
        stats["packed_rows"] = len(train)
    return DataBundle(train=train, val=val, stats=stats)


def _encode_all(rows: list[Row], configs: dict, cfg: DataConfig, tokenizer, counts: dict) -> list[dict]:
    out = []
    examples = []
    for at in range(0, len(rows), 256):  # a tokenizer call per 256 rows (render_examples)
        part = rows[at : at + 256]
        examples += render_examples([(row, configs.get(f, cfg), where(f, n)) for f, n, row in part], tokenizer)
    for ex in examples:
        if len(ex["input_ids"]) > cfg.max_length:
            counts["truncated"] += 1
            ex = {k: v[: cfg.max_length] for k, v in ex.items()}
        # label at position 0 is never a target (causal shift), so it does not count
        if all(t == IGNORE for t in ex["labels"][1:]):
            counts["dropped"] += 1
            continue
        out.append(ex)
    return out


def describe(bundle: DataBundle, cfg: DataConfig) -> str:
    """What `tunelab data prepare` prints: the counts, why rows were cut or dropped, the cache, and a
    histogram of the training rows' lengths."""
    import numpy as np

    s = bundle.stats
    lines = [
        f"rows read       {s['rows_read']}",
        f"train rows      {s['train_rows']}"
        + (f" (packed into {s['packed_rows']} rows)" if "packed_rows" in s else ""),
        f"val rows        {s['val_rows']}",
        f"tokens          {s['tokens']} in train rows, {s['label_tokens']} of them with loss",
        f"truncated       {s['truncated']} (longer than data.max_length={cfg.max_length}: cut to it)",
        f"dropped         {s['dropped']} (no reply token left within data.max_length={cfg.max_length})",
    ]
    if bundle.cache:
        state = "hit" if bundle.cache["hit"] else "written"
        lines.append(f"cache           {state} in {bundle.cache['seconds']} s: " + ", ".join(bundle.cache["folders"]))
    else:
        lines.append("cache           none: read and tokenised in memory (data.cache: off, or auto under 16 MB)")
    lengths = (
        bundle.train.lengths()
        if hasattr(bundle.train, "lengths")
        else np.array([len(e["input_ids"]) for e in bundle.train])
    )
    return "\n".join(lines + length_histogram(lengths, cfg.max_length, "train rows"))


def length_histogram(lengths, max_length: int, what: str) -> list[str]:
    """Eight bars of `lengths` (tokens) from 1 to max_length, as `tunelab data prepare` prints them."""
    import numpy as np

    edges = np.unique(np.linspace(0, max_length, 9).round().astype(int))
    # bins (lo, hi] as labelled: length lo + 1 to hi
    counts, _ = np.histogram(np.asarray(lengths), bins=edges + 0.5)
    top = max(int(counts.max()), 1)
    lines = [f"length of the {what} (tokens):"]
    for lo, hi, n in zip(edges, edges[1:], counts):
        lines.append(f"  {lo + 1:>6}-{hi:<6} {'#' * round(40 * n / top):<40} {n}")
    return lines
