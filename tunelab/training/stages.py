"""A stage is a model class, a batch shape and a loss on the one training loop.

  sft / pretrain    causal LM; rows -> token ids with a response mask; summed next-token CE
  classification    *ForSequenceClassification; (text, text_pair) -> label; summed CE (MSE for
                    regression); task metrics (accuracy, F1, MCC / Pearson, Spearman) at the end

`loss_sum(model, batch)` returns (sum of the loss terms, number of terms) and `count(batch)` the
number of terms a batch holds, so the loop can normalise a whole optimizer step exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.training.loss import token_loss_sum


@dataclass
class Stage:
    name: str
    load_model: Callable  # (cfg, device) -> (model, tokenizer)
    build_data: Callable  # (cfg, tokenizer) -> DataBundle
    collate: Callable  # (examples, pad_id) -> batch
    loss_sum: Callable  # (model, batch) -> (loss tensor, n terms)
    count: Callable  # batch -> n terms
    final_metrics: Callable | None = None  # (model, tokenizer, cfg, data, device) -> dict
    manifest: Callable | None = None  # cfg -> extra keys for final/tunelab.json


# --------------------------------------------------------------------------- causal LM (sft, pretrain)
def _lm_load(cfg, device):
    from tunelab.models import load_model

    return load_model(cfg.model, device=device)


def _lm_data(cfg, tokenizer):
    from tunelab.data import build_datasets

    return build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage)


def _lm_collate(examples, pad_id):
    from tunelab.data import collate

    return collate(examples, pad_id)


def _lm_count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


LM = Stage("lm", _lm_load, _lm_data, _lm_collate, token_loss_sum, _lm_count)


# ----------------------------------------------------------------------------------- classification
def task_of(tcfg):
    """The Task a `task:` section describes: a preset, or a custom one over the user's files."""
    from tunelab.evaluation.tasks import Task, get_task

    if tcfg.name:
        return get_task(tcfg.name)
    labels = tuple(tcfg.labels) if tcfg.type == "classification" else ()
    if tcfg.type == "classification" and len(labels) < 2:
        from tunelab.config import ConfigError

        raise ConfigError("task.labels: list the class names (at least two) for your own classification files")
    return Task(name="custom", type=tcfg.type, labels=labels, main_metric="accuracy" if labels else "pearson")


def num_labels(task) -> int:
    return 1 if task.type == "regression" else len(task.labels)


def _cls_load(cfg, device):
    from transformers import AutoModelForSequenceClassification

    from tunelab.models import load_model

    task = task_of(cfg.task)
    problem = "regression" if task.type == "regression" else "single_label_classification"
    return load_model(
        cfg.model,
        device=device,
        auto_class=AutoModelForSequenceClassification,
        num_labels=num_labels(task),
        problem_type=problem,
        ignore_mismatched_sizes=True,  # a checkpoint's own head may have another number of classes
    )


def _cls_rows(tcfg, split: str, seed: int):
    from tunelab.evaluation.tasks import load_split, load_task_file

    task = task_of(tcfg)
    limit = tcfg.train_limit if split == "train" else tcfg.dev_limit
    own = tcfg.train_file if split == "train" else tcfg.dev_file
    if own:
        return load_task_file(task, own, limit=limit, seed=seed)
    if task.name == "custom":
        return []
    return load_split(task, split, limit=limit, seed=seed)


def encode_pairs(rows: list[dict], tokenizer, max_length: int, regression: bool) -> list[dict]:
    """(text, text_pair, label) rows -> token ids; pairs use the tokenizer's own pair format ([SEP] etc.)."""
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    has_pair = any(p is not None for p in pairs)
    enc = tokenizer(texts, [p or "" for p in pairs] if has_pair else None, truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "label": float(r["label"]) if regression else int(r["label"])}
        for ids, r in zip(enc["input_ids"], rows)
    ]


def _cls_data(cfg, tokenizer):
    from tunelab.data import DataBundle

    task = task_of(cfg.task)
    regression = task.type == "regression"
    train_rows = _cls_rows(cfg.task, "train", cfg.training.seed)
    dev_rows = _cls_rows(cfg.task, "dev", cfg.training.seed)
    train = encode_pairs(train_rows, tokenizer, cfg.task.max_length, regression)
    dev = encode_pairs(dev_rows, tokenizer, cfg.task.max_length, regression)
    truncated = sum(len(e["input_ids"]) >= cfg.task.max_length for e in train + dev)
    stats = {"task": task.name, "train_rows": len(train), "val_rows": len(dev), "truncated": truncated}
    return DataBundle(train=train, val=dev, stats=stats)


def _cls_collate(examples, pad_id):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    dtype = torch.float32 if isinstance(examples[0]["label"], float) else torch.long
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([e["label"] for e in examples], dtype=dtype),
    }


def _cls_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _cls_loss(model, batch):
    logits, labels = _cls_logits(model, batch), batch["labels"]
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels, reduction="sum"), labels.numel()
    return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()


@torch.no_grad()
def predict(model, examples: list[dict], pad_id: int, device, batch_size: int = 32) -> list:
    """Class ids (or regression scores) for encoded examples."""
    model.eval()
    out: list = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in _cls_collate(examples[i : i + batch_size], pad_id).items()}
        logits = _cls_logits(model, batch)
        out += logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    return out


def task_metrics(task, preds: list, refs: list) -> dict:
    from tunelab.evaluation import metrics as M

    if task.type == "regression":
        return {"pearson": M.pearson(preds, refs), "spearman": M.spearman(preds, refs)}
    return M.classification_metrics(preds, refs, num_labels=len(task.labels))


def _cls_final(model, tokenizer, cfg, data, device) -> dict:
    if not data.val:
        return {}
    task = task_of(cfg.task)
    preds = predict(model, data.val, tokenizer.pad_token_id, device, cfg.training.batch_size * 4)
    return {f"dev_{k}": v for k, v in task_metrics(task, preds, [e["label"] for e in data.val]).items()}


def _cls_manifest(cfg) -> dict:
    task = task_of(cfg.task)
    return {"task": {"name": task.name, "type": task.type, "labels": list(task.labels), "num_labels": num_labels(task)}}


CLASSIFICATION = Stage(
    "classification",
    _cls_load,
    _cls_data,
    _cls_collate,
    _cls_loss,
    lambda b: int(b["labels"].numel()),
    _cls_final,
    _cls_manifest,
)


def stage_for(name: str) -> Stage:
    return CLASSIFICATION if name == "classification" else LM
