"""`tunelab eval MODEL_OR_RUN --task perplexity --data FILE --context N`: held-out perplexity at a given length.

The texts of FILE (a .txt file as one document, or the `text` column of .jsonl / .json / .csv rows) are
tokenised, joined with the end-of-text token and cut into non-overlapping windows of exactly N tokens; each
window is one forward pass, and every token after a window's first is scored (so a window's last positions
are at N-1: the length whose quality a RoPE scaling is about, docs/long-context.md). One window at a time,
so memory grows with N alone, as the attention kernel (SDPA) allows.
"""

from __future__ import annotations

import math
from pathlib import Path

from tunelab.data import DataError, read_rows


def read_texts(path: str, column: str = "text") -> list[str]:
    """The texts of a .txt file (whole) or of a rows file's `column`; DataError naming the file and row."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise DataError(f"--data {path}: file not found")
        return [p.read_text(encoding="utf-8")]
    texts = []
    for file, line, row in read_rows(path):
        value = row.get(column)
        if not isinstance(value, str):
            raise DataError(f"{file}:{line}: needs a text column {column!r} (a string) for perplexity; "
                            f"this row has {sorted(row)}")  # fmt: skip
        texts.append(value)
    return texts


def windows(tokenizer, texts: list[str], context: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly `context` token ids over the texts joined by the eos token."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    out = [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)]
    return out[:limit] if limit else out


def context_perplexity(model, tokenizer, texts: list[str], context: int, device, limit: int | None = None,
                       source: str = "--data") -> dict:  # fmt: skip
    """Perplexity over every window's tokens after its first; the window count, tokens and context with it, and
    each window's summed NLL (`window_nll`)."""
    import torch

    chunks = windows(tokenizer, texts, context, limit)
    if not chunks:
        n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        raise DataError(f"{source}: holds {n:,} tokens, fewer than one window of --context {context}; "
                        "give more text or a shorter --context")  # fmt: skip
    per_window = []
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            per_window.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")))
    nll, count = sum(per_window), len(chunks) * (context - 1)
    # window_nll: each window's summed NLL (equal token counts), for intervals over windows (bench/rope_context.py)
    return {"perplexity": math.exp(nll / count), "loss": nll / count, "windows": len(chunks), "tokens": count,
            "context": context, "window_nll": per_window}  # fmt: skip
