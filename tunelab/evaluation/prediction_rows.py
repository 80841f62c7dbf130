"""Per-row predictions: their format, their file, and the one pure function that turns them into metrics.

A run's evaluation is kept as rows (one JSON object per dev row, in row order), so a report can store
them (`predictions.jsonl`), recompute each metric exactly from the file, and resample rows for
bootstrap confidence intervals:

  classification  {"index", "label": int, "prediction": int, "scores": [per-class log-score]}
                  (verbalizer: log of the probability mass on the class's words; head: log-softmax)
  regression      {"index", "label": float, "prediction": float}
  instruction     {"index", "loss_sum": summed response-token NLL, "tokens": int}

Floats are stored as JSON numbers with Python's repr, which reads back bit for bit, so
`prediction_metrics(task, read_predictions(path))` equals the metrics of the evaluation itself. No torch here
(predictions.py makes the rows from a model): `tunelab compare`'s own process fits its references and writes its
report with this module alone, leaving the cores to its cells' process server while that imports torch & co.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tunelab import metrics as M
from tunelab.data import tasks


# ---------------------------------------------------------------------------------- metrics side
def prediction_metrics(task, predictions: list[dict]) -> dict:
    """The task's metrics from per-row predictions (pure: the same numbers from memory or from JSONL)."""
    if isinstance(task, str):
        task = tasks.get_task(task)
    if task.type == "instruction" or (predictions and "loss_sum" in predictions[0]):
        return perplexity_metrics(predictions)
    preds, refs = [p["prediction"] for p in predictions], [p["label"] for p in predictions]
    if task.type == "regression":
        return {"pearson": M.pearson(preds, refs), "spearman": M.spearman(preds, refs)}
    if task.type == "classification":
        return M.classification_metrics(preds, refs, num_labels=len(task.labels))
    raise ValueError(f"no per-row metrics for {task.type} tasks")


def class_log_loss(predictions: list[dict]) -> float | None:
    """Mean cross-entropy of the gold class under a softmax over each row's class scores (None without
    scores). A proper scoring rule: on a small validation set it ranks models with far less noise than
    accuracy, which moves in steps of 1/n."""
    if not predictions or not all("scores" in p for p in predictions):
        return None
    import math

    total = 0.0
    for p in predictions:
        top = max(p["scores"])
        log_norm = top + math.log(sum(math.exp(s - top) for s in p["scores"]))
        total += log_norm - p["scores"][int(p["label"])]
    return total / len(predictions)


def perplexity_metrics(predictions: list[dict]) -> dict:
    """Perplexity over all response tokens (a token-weighted mean, not a mean of per-row perplexities)."""
    total = sum(p["loss_sum"] for p in predictions)
    count = sum(p["tokens"] for p in predictions)
    return {"perplexity": M.perplexity(total, count), "loss": total / count, "tokens": count}


# ---------------------------------------------------------------------------------------- files
def write_predictions(path: str | Path, predictions: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # beside the target (os.replace is atomic within one file system), named per process and thread
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_predictions(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
