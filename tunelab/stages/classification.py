"""classification: *ForSequenceClassification; (text, text_pair) -> label; summed CE (MSE for regression);
task metrics (accuracy, F1, MCC / Pearson, Spearman) on the dev rows at the end."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tunelab import metrics as M
from tunelab.data import DataBundle, pad
from tunelab.models import load_model
from tunelab.models.loss import last_token_scores
from tunelab.stages.base import Stage, check_task_files, num_labels, task_of, task_rows


def load(cfg, device):
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


def build(cfg, tokenizer):
    task = task_of(cfg.task)
    regression = task.type == "regression"
    train_rows = task_rows(cfg.task, "train", cfg.training.seed)
    dev_rows = task_rows(cfg.task, "dev", cfg.training.seed)
    train = encode_pairs(train_rows, tokenizer, cfg.task.max_length, regression)
    dev = encode_pairs(dev_rows, tokenizer, cfg.task.max_length, regression)
    truncated = sum(len(e["input_ids"]) >= cfg.task.max_length for e in train + dev)
    stats = {"task": task.name, "train_rows": len(train), "val_rows": len(dev), "truncated": truncated}
    return DataBundle(train=train, val=dev, stats=stats)


def classification_collate(examples, pad_id):
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    dtype = torch.float32 if isinstance(examples[0]["label"], float) else torch.long
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([e["label"] for e in examples], dtype=dtype),
    }


def classification_logits(model, batch):
    """A decoder's head at each row's last token, its rows laid end to end where accel's packed attention runs (no
    compute on padding); an encoder's, or with accelerate off, the model's own forward (models/loss.py)."""
    return last_token_scores(model, batch).float()


def loss_sum(model, batch):
    logits, labels = classification_logits(model, batch), batch["labels"]
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels, reduction="sum"), labels.numel()
    return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()


@torch.no_grad()
def predict(model, examples: list[dict], pad_id: int, device, batch_size: int = 32) -> list:
    """Class ids (or regression scores) for encoded examples."""
    model.eval()
    out: list = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in classification_collate(examples[i : i + batch_size], pad_id).items()}
        logits = classification_logits(model, batch)
        out += logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    return out


def task_metrics(task, preds: list, refs: list) -> dict:
    if task.type == "regression":
        return {"pearson": M.pearson(preds, refs), "spearman": M.spearman(preds, refs)}
    return M.classification_metrics(preds, refs, num_labels=len(task.labels))


def final_metrics(model, tokenizer, cfg, data, device) -> dict:
    if not data.val:
        return {}
    task = task_of(cfg.task)
    preds = predict(model, data.val, tokenizer.pad_token_id, device, cfg.training.batch_size * 4)
    return {f"dev_{k}": v for k, v in task_metrics(task, preds, [e["label"] for e in data.val]).items()}


def manifest(cfg) -> dict:
    task = task_of(cfg.task)
    return {"task": {"name": task.name, "type": task.type, "labels": list(task.labels), "num_labels": num_labels(task)}}


def reload(manifest: dict) -> dict:
    """The base of a saved run gets a fresh head of the run's size; the method's load() restores it."""
    task = manifest["task"]
    problem = "regression" if task["type"] == "regression" else "single_label_classification"
    return {
        "auto_class": AutoModelForSequenceClassification,
        "num_labels": task["num_labels"],
        "problem_type": problem,
        "ignore_mismatched_sizes": True,
    }


def stage(cfg=None) -> Stage:
    return Stage(
        "classification", load, build, classification_collate, loss_sum, lambda b: int(b["labels"].numel()),
        final_metrics, manifest, reload=reload, check_data=check_task_files("classification"),
    )  # fmt: skip
