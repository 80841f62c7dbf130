"""Best-fit-decreasing packing of tokenized examples into rows of at most max_length tokens.

Each packed row carries position_ids that restart at 0 where an example starts; `collate`
passes them without an attention_mask, which is what makes transformers build a
block-diagonal causal mask (see collate.py). The first label of every example is -100 so
no loss term predicts one example's first token from the previous example.

Why best fit decreasing rather than filling rows in data order: rows are padded to the widest
row of their batch, and every pad position costs a full forward and backward pass. Filling in
order leaves ~20% of an instruction set's row slots empty at max_length 256 (alpaca demo: 13,944
positions for 11,343 tokens); placing the longest examples first, each into the fullest row that
still has room, leaves ~1-4% (the same packing TRL uses, `packing_strategy="bfd"`).
"""

from __future__ import annotations

from bisect import bisect_left, insort

from tunelab.data.templating import IGNORE


def pack(examples: list[dict], max_length: int) -> list[dict]:
    rows: list[dict] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the best fit is the first with room >= n
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep data order
    for i in order:
        ex = examples[i]
        n = len(ex["input_ids"])
        at = bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[r]
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE] + list(ex["labels"][1:])
        row["position_ids"] += list(range(n))
        if room - n > 0:
            insort(free, (room - n, r))
    return rows
