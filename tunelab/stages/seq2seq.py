"""seq2seq: *ForConditionalGeneration (T5, BART); prefix + source -> target; summed token CE over target
tokens; BLEU and embedding cosine of generated outputs on the dev rows at the end."""

from __future__ import annotations

import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM

from tunelab.data import pad
from tunelab.models import load_config, load_model
from tunelab.models.generation import generate_seq2seq, generation_scores
from tunelab.stages.base import RowsBundle, Stage, check_task_files, task_of, task_rows

T5_PREFIXES = {"wmt14-en-de": "translate English to German: "}


def seq2seq_prefix(tcfg, model_cfg) -> str:
    """task.prefix, or (null) T5's own task prefix for a preset it knows when the model is a T5."""
    if tcfg.prefix is not None:
        return tcfg.prefix
    if tcfg.name not in T5_PREFIXES:
        return ""
    return T5_PREFIXES[tcfg.name] if _model_type(model_cfg) in ("t5", "mt5", "umt5") else ""


def _model_type(model_cfg) -> str | None:
    try:
        return load_config(model_cfg).model_type
    except Exception:  # the model load itself reports an unusable spec
        return None


def load(cfg, device):
    task_of(cfg.task, "seq2seq")
    return load_model(cfg.model, device=device, auto_class=AutoModelForSeq2SeqLM)


def encode_seq2seq(rows: list[dict], tokenizer, prefix: str, max_length: int, max_target_length: int) -> list[dict]:
    """{"input_ids": prefix + source, "labels": target ids ending with EOS} per row."""
    src = tokenizer([prefix + r["source"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
    tgt = tokenizer(text_target=[r["target"] for r in rows], truncation=True, max_length=max_target_length)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for s, t in zip(src, tgt):
        if eos is not None and (not t or t[-1] != eos):  # a tokenizer without a post-processor adds no EOS
            t = t[: max_target_length - 1] + [eos]
        out.append({"input_ids": s, "labels": t})
    return out


def build(cfg, tokenizer):
    task = task_of(cfg.task, "seq2seq")
    t = cfg.task
    prefix = seq2seq_prefix(t, cfg.model)
    train_rows = task_rows(t, "train", cfg.training.seed, "seq2seq")
    dev_rows = task_rows(t, "dev", cfg.training.seed, "seq2seq")
    train = encode_seq2seq(train_rows, tokenizer, prefix, t.max_length, t.max_target_length)
    dev = encode_seq2seq(dev_rows, tokenizer, prefix, t.max_length, t.max_target_length)
    stats = {
        "task": task.name,
        "train_rows": len(train),
        "val_rows": len(dev),
        "prefix": prefix,
        "truncated": sum(len(e["input_ids"]) >= t.max_length for e in train + dev),
        "target_tokens": sum(len(e["labels"]) for e in train),
    }
    return RowsBundle(train=train, val=dev, stats=stats, val_rows=dev_rows)


def collate(examples, pad_id):
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_sum(model, batch):
    """Summed CE over target tokens; the model builds decoder inputs from the labels (shift right)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def seq2seq_settings(cfg) -> dict:
    t = cfg.task
    return {
        "prefix": seq2seq_prefix(t, cfg.model),
        "max_length": t.max_length,
        "max_new_tokens": t.max_new_tokens,
        "num_beams": t.num_beams,
        "embedding_model": t.embedding_model,
    }


def final_metrics(model, tokenizer, cfg, data, device) -> dict:
    if not data.val_rows:
        return {}
    s = seq2seq_settings(cfg)
    hyps = generate_seq2seq(
        model, tokenizer, [r["source"] for r in data.val_rows], s["prefix"], s["max_length"], s["max_new_tokens"],
        s["num_beams"], cfg.training.batch_size * 4, device,
    )  # fmt: skip
    scores = generation_scores(hyps, [r["target"] for r in data.val_rows], s["embedding_model"])
    return {f"dev_{k}": v for k, v in scores.items()}


def manifest(cfg) -> dict:
    task = task_of(cfg.task, "seq2seq")
    return {"task": {"name": task.name, "type": "seq2seq", **seq2seq_settings(cfg)}}


def stage(cfg=None) -> Stage:
    return Stage(
        "seq2seq", load, build, collate, loss_sum, lambda b: int((b["labels"] != -100).sum()), final_metrics,
        manifest, reload=lambda manifest: {"auto_class": AutoModelForSeq2SeqLM},
        check_data=check_task_files("seq2seq"),
    )  # fmt: skip
