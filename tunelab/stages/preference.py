"""What the preference stages (reward, dpo) share: pairs read and encoded from `data.format: preference`
files (tunelab/data/preference.py), one loss term per pair, and scoring the validation pairs.

A pair is batched as two rows of one padded batch (B chosen rows, then B rejected rows), so one forward
pass scores both.
"""

from __future__ import annotations

import random

import torch

from tunelab.data import DataBundle, cap_validation, split_rows
from tunelab.data.errors import DataError
from tunelab.data.preference import collate_pairs, encode_preference, read_preference_pairs
from tunelab.data.sources import reading_key, resolve, source_rows

# check_pairs' reading, kept for the pairs_data call that follows it (one entry: the run being started),
# under reading_key: a changed file, setting or folder makes it a miss, never a stale hit
_CHECKED: dict = {}


def _read_pairs(d, seed: int = 0) -> tuple[list[dict], dict, list[dict] | None]:
    """(train pairs, stats, validation pairs or None) of a data section."""
    if not d.train:
        raise DataError("data.train is not set: give a preference file ({prompt, chosen, rejected}, hh-rlhf or "
                        "ShareGPT with chosen / rejected).")  # fmt: skip
    pairs, stats = _read_sources(d, d.train, seed)
    pairs = pairs[: d.limit]
    if not d.validation:
        return pairs, stats, None
    val_pairs, vstats = _read_sources(d, [d.validation], seed)
    return pairs, {k: stats[k] + vstats[k] for k in stats}, val_pairs


def _read_sources(d, entries, seed) -> tuple[list[dict], dict]:
    """The pairs of every source of `entries` (a file, a registry name, or a list), each with its columns."""

    def read(src, limit, rows):
        return read_preference_pairs(src.path, src.cfg.columns, limit, roles=src.cfg.roles, rows=rows)

    return read_sources(d, entries, seed, "dpo", read)


def read_sources(d, entries, seed: int, stage: str, read) -> tuple[list, dict]:
    """What `read(source, limit, rows) -> (items, stats)` gives for every source of `entries` (a file, a registry
    name, or a list), each with its columns; limit / samples / weight applied per source (seeded), stats summed."""
    items, stats = [], {}
    for src in resolve(d, stage, entries):
        limit = src.limit or (d.limit if not isinstance(entries, list) else None)
        part, s = read(src, limit, source_rows(src, d.hub_split, d.hub_config))
        n = src.samples if src.samples else round(len(part) * src.weight) if src.weight else None
        if n is not None:
            whole, rest = divmod(n, len(part))
            part = part * whole + random.Random(f"{seed}:{src.path}").sample(part, rest)
        items += part
        stats = {k: stats.get(k, 0) + v for k, v in s.items()}
    return items, stats


def check_reading(cfg, stage: str, read) -> None:
    """A Stage.check_data: `read(data section, seed)` now, before the model loads, kept for `checked_reading`."""
    _CHECKED.clear()
    _CHECKED[reading_key(cfg.data, cfg.training.seed, stage)] = read(cfg.data, cfg.training.seed)


def checked_reading(cfg, stage: str, read):
    """What `check_reading` read for this run's data section, or `read(data section, seed)` again (a changed file
    or setting misses: reading_key)."""
    kept = _CHECKED.pop(reading_key(cfg.data, cfg.training.seed, stage), None)
    return kept or read(cfg.data, cfg.training.seed)


def with_system(item: dict, system: str | None) -> dict:
    """`item` (a pair or an example: its "prompt" a message list) with data.system_prompt first, where set and
    the prompt has no system message of its own."""
    if not system or item["prompt"][0]["role"] == "system":
        return item
    return {**item, "prompt": [{"role": "system", "content": system}] + item["prompt"]}


def check_pairs(cfg) -> None:
    """Stage.check_data: the pairs read and checked before the model loads; pairs_data then takes them."""
    check_reading(cfg, "dpo", _read_pairs)


def pairs_data(cfg, tokenizer) -> DataBundle:
    d = cfg.data
    pairs, stats, val_pairs = checked_reading(cfg, "dpo", _read_pairs)
    if val_pairs is not None:
        train_pairs, val_pairs = pairs, cap_validation(val_pairs, d.val_max_rows, cfg.training.seed)
    else:
        train_pairs, val_pairs = split_rows(pairs, d.val_fraction, cfg.training.seed, d.val_max_rows)

    def encode(ps, part):
        out = []
        for i, p in enumerate(ps, 1):
            out.append(encode_preference(with_system(p, d.system_prompt), tokenizer, d.max_length, f"{part} pair {i}"))
        return out

    train, val = encode(train_pairs, "train"), encode(val_pairs, "validation")
    stats.update(
        train_pairs=len(train),
        val_pairs=len(val),
        truncated=sum(e["truncated"] for e in train + val),
        tokens=sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in train),
    )
    return DataBundle(train=train, val=val, stats=stats)


def pair_count(batch) -> int:
    return len(batch["last"]) // 2 if "last" in batch else batch["input_ids"].shape[0] // 2


@torch.no_grad()
def eval_pairs(fn, model, data, pad_id, device, batch_size, collate=collate_pairs) -> list[torch.Tensor]:
    """fn(model, batch) -> tensors per pair (per example: kto's `collate`), over all validation rows, concatenated
    (model in eval mode)."""
    was_training = model.training
    model.eval()
    parts = []
    for i in range(0, len(data.val), batch_size):
        batch = {k: v.to(device) for k, v in collate(data.val[i : i + batch_size], pad_id).items()}
        parts.append([t.float().cpu() for t in fn(model, batch)])
    model.train(was_training)
    return [torch.cat(p) for p in zip(*parts)]
