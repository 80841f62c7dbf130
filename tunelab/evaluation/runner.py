"""`tunelab eval MODEL_OR_RUN --task T`: score a base model or any run on a task's dev split.

How a model is scored depends on what it is:
  - a sequence classifier (a `stage: classification` run): argmax of its head;
  - a causal LM on a classification task: the task phrased as an instruction (evaluation/prompts.py),
    the class read off the next-token distribution with a verbalizer (one forward pass per row, no
    decoding, so zero-shot and tuned models are scored identically);
  - a causal LM on an instruction task (lima, alpaca): perplexity of the reference responses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tunelab.evaluation import metrics as M


def evaluate(
    model_or_run: str,
    task_name: str,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    from tunelab.evaluation.tasks import get_task, load_split
    from tunelab.inference import load_run
    from tunelab.models import resolve_device

    task = get_task(task_name)
    rows = load_split(task, "dev", limit=limit, seed=seed)
    dev = resolve_device(device)
    model, tokenizer = load_run(model_or_run, device=device)
    model.eval()
    t0 = time.time()
    if _is_classifier(model):
        from tunelab.training.stages import encode_pairs, predict, task_metrics

        examples = encode_pairs(rows, tokenizer, 256, task.type == "regression")
        preds = predict(model, examples, tokenizer.pad_token_id, dev, batch_size)
        scores, how = task_metrics(task, preds, [r["label"] for r in rows]), "classification head"
    elif task.type == "classification":
        scores, how = verbalizer_scores(model, tokenizer, task, rows, dev, batch_size, progress), "verbalizer"
    elif task.type in ("instruction",):
        scores, how = response_perplexity(model, tokenizer, rows, dev, batch_size, progress), "perplexity"
    else:
        raise NotImplementedError(
            f"tunelab eval does not score {task.type} tasks with this model yet; "
            "classification (head or verbalizer) and instruction perplexity are supported"
        )
    return {
        "model": str(model_or_run),
        "task": task.name,
        "method": how,
        "n": len(rows),
        "metrics": scores,
        "seconds": round(time.time() - t0, 1),
    }


def _is_classifier(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


@torch.no_grad()
def verbalizer_scores(model, tokenizer, task, rows, device, batch_size=16, progress=True) -> dict:
    from tqdm.auto import tqdm

    from tunelab.data import build_prompt_ids
    from tunelab.evaluation.prompts import instruction, label_words
    from tunelab.methods.verbalizer import Verbalizer, next_token_logits

    words = label_words(task)
    # the answer starts a new assistant turn, so the word is not preceded by a space
    verbalizer = Verbalizer({w: [w, w.capitalize()] for w in words}, tokenizer, leading_space=False)
    prompts = [build_prompt_ids([{"role": "user", "content": instruction(task, r)}], tokenizer) for r in rows]
    preds: list[int] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"eval {task.name}", disable=not progress, unit="batch"):
        chunk = prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, : len(p)], mask[j, : len(p)] = torch.tensor(p), 1
        logits = next_token_logits(model, ids.to(device), mask.to(device))
        preds += verbalizer.predict(logits.float()).tolist()
    return M.classification_metrics(preds, [r["label"] for r in rows], num_labels=len(words))


@torch.no_grad()
def response_perplexity(model, tokenizer, rows, device, batch_size=8, progress=True) -> dict:
    from tqdm.auto import tqdm

    from tunelab.config import DataConfig
    from tunelab.data import collate, render_example
    from tunelab.training.loss import token_loss_sum

    cfg = DataConfig(max_length=1024)
    examples = [render_example(r, cfg, tokenizer) for r in rows]
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="eval perplexity", disable=not progress, unit="batch"):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
        loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    return {"perplexity": M.perplexity(total, count), "loss": total / count, "tokens": count}


def write_result(result: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
