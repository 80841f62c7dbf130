"""Greedy packing of tokenized examples into rows of at most max_length tokens.

Each packed row carries position_ids that restart at 0 where an example starts; `collate`
passes them without an attention_mask, which is what makes transformers build a
block-diagonal causal mask (see collate.py). The first label of every example is -100 so
no loss term predicts one example's first token from the previous example.
"""

from __future__ import annotations

from tunelab.data.templating import IGNORE


def pack(examples: list[dict], max_length: int) -> list[dict]:
    rows: list[dict] = []
    row = _empty()
    for ex in examples:
        n = len(ex["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > max_length:
            rows.append(row)
            row = _empty()
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE] + list(ex["labels"][1:])
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def _empty() -> dict:
    return {"input_ids": [], "labels": [], "position_ids": []}
