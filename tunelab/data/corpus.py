"""Plain-text corpora for pre-training (and tokenizer training): files read whole as documents, a
contiguous held-out tail, and token blocks.

    docs = read_documents(["input.txt"])                        # [(file, text)], text files read whole
    train, heldout = split_documents(docs, 0.1)                 # the last 10% of each, cut at a line start
    blocks = causal_blocks(ids, 256)                            # [{"input_ids", "labels"}], every token a target once

A text file (.txt, .text, .md) is one document; a data file (.jsonl, .json, .csv, .tsv, .parquet, optionally
.gz) gives one document per row (its text column). The held-out text is the tail of each document rather than
random lines: neighbouring lines of a play are near copies of each other's context, so a random line split
would score the model on text it has all but seen (nanoGPT holds out the last 10% of Tiny Shakespeare too).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config import is_text_path
from tunelab.data.errors import DataError
from tunelab.data.packing import pack
from tunelab.data.readers import read_rows
from tunelab.data.templating import IGNORE

Document = tuple[str, str]  # (file, text)


is_text_file = is_text_path  # .txt, .text, .md (optionally .gz): read whole, one document


def all_text_files(entries) -> bool:
    """True when `entries` (a data.train value: one path or a list of paths) are all plain text files."""
    if entries is None:
        return False
    entries = entries if isinstance(entries, list) else [entries]
    return bool(entries) and all(isinstance(e, str) and is_text_file(e) for e in entries)


def read_text_file(path: str) -> str:
    """A text file's contents (UTF-8, optionally gzipped); a named DataError when missing, empty or not UTF-8."""
    import gzip

    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a text file; give the file itself")
    if not p.is_file():
        raise DataError(f"{path}: file not found (looked in {Path.cwd()})")
    data = gzip.decompress(p.read_bytes()) if p.name.lower().endswith(".gz") else p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file holds no text")
    return text


def read_documents(sources, text_column: str = "text") -> list[Document]:
    """(file, text) of every document in `sources`: a text file whole, a data file's rows one each."""
    docs: list[Document] = []
    for source in sources if isinstance(sources, (list, tuple)) else [sources]:
        source = str(source)
        if is_text_file(source):
            docs.append((source, read_text_file(source)))
            continue
        rows = read_rows(source)
        for file, number, row in rows:
            value = row.get(text_column)
            if not isinstance(value, str):
                raise DataError(
                    f"{file} line {number}: no text in column {text_column!r} (found {sorted(row)[:6]}); "
                    "a corpus row needs a text field (data.columns.text)"
                )
            if value.strip():
                docs.append((f"{file}:{number}", value))
        if not rows:
            raise DataError(f"{source}: no rows")
    return docs


def split_documents(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out): the last `fraction` of each document's characters is held out, cut where a line
    starts (the whole document stays in train when it has a single line or `fraction` is 0)."""
    train, heldout = [], []
    for name, text in docs:
        cut = len(text) - round(len(text) * fraction)
        if fraction > 0:
            at = text.rfind("\n", 0, cut) + 1
            cut = at if at > 0 else len(text)
        if cut < len(text):
            heldout.append((name, text[cut:]))
        if cut > 0:
            train.append((name, text[:cut]))
    return train, heldout


def corpus_split(data_cfg) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents of a plain-text `data:` section: data.validation when given, else the
    held-out tail (data.val_fraction) of each training document. Errors are named before a model loads."""
    if not all_text_files(data_cfg.train):
        raise DataError("data.train: a plain-text corpus is one or more .txt files")
    docs = read_documents(data_cfg.train)
    if data_cfg.validation:
        return docs, read_documents(data_cfg.validation)
    train, heldout = split_documents(docs, data_cfg.val_fraction)
    if data_cfg.val_fraction > 0 and not heldout:
        raise DataError(
            f"{data_cfg.train}: no held-out text: each file has a single line; give data.validation (a .txt file) "
            "or more lines"
        )
    return train, heldout


def causal_blocks(ids: list[int], length: int, start: int | None = None) -> list[dict]:
    """A causal LM's training / evaluation rows over one document's token ids.

    With `start` (a separator id: bos, else eos) the document begins with it, so its first real token is
    predicted too. Consecutive blocks overlap by one token: the last token of a block is the first (context
    only) of the next, so every token after the first is a target exactly once, with the most context a block
    allows; the held-out loss then covers the whole text, which per-character perplexity needs. The last block
    is shorter."""
    ids = ([start] if start is not None else []) + list(ids)
    if length < 2:
        raise ValueError("causal_blocks: a block needs at least 2 tokens")
    out = []
    step = length - 1
    for i in range(0, max(len(ids) - 1, 1), step):
        block = ids[i : i + length]
        if len(block) > 1:
            out.append({"input_ids": block, "labels": list(block)})
    return out


def pack_tails(blocks: list[dict], length: int) -> list[dict]:
    """Full blocks as they are; the shorter last blocks of several documents packed together (position ids
    restart per document, so none attends to another: data/packing.py)."""
    full = [b for b in blocks if len(b["input_ids"]) == length]
    short = [b for b in blocks if len(b["input_ids"]) < length]
    return full + pack(short, length) if len(short) > 1 else blocks


def mlm_blocks(ids: list[int], length: int, first: int | None, last: int | None) -> list[list[int]]:
    """A masked LM's rows over one document's ids: pieces of `length` minus the special tokens, each wrapped
    as BERT's inputs are ([CLS] piece [SEP]; `first` / `last` None leave that end bare)."""
    inner = length - (first is not None) - (last is not None)
    if inner < 1:
        raise ValueError("mlm_blocks: no room for text in a block")
    out = []
    for i in range(0, len(ids), inner):
        piece = ids[i : i + inner]
        out.append(([first] if first is not None else []) + piece + ([last] if last is not None else []))
    return out


def targets(example: dict) -> int:
    """Label tokens of a causal block that are targets (every position after the first)."""
    return sum(t != IGNORE for t in example["labels"][1:])
