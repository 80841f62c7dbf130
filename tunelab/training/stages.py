"""A stage is a model class, a batch shape and a loss on the one training loop.

  sft / pretrain    causal LM; rows -> token ids with a response mask; summed next-token CE
  classification    *ForSequenceClassification; (text, text_pair) -> label; summed CE (MSE for
                    regression); task metrics (accuracy, F1, MCC / Pearson, Spearman) at the end
  extractive_qa     *ForQuestionAnswering; (question, context window) -> start / end token; summed CE
                    of start and end (2 terms per window); SQuAD EM / F1 at the end (evaluation/qa.py)
  seq2seq           *ForConditionalGeneration (T5, BART); prefix + source -> target; summed token CE
                    over target tokens; BLEU and embedding cosine of generated outputs at the end
  mlm               *ForMaskedLM; text -> 15% of tokens masked (80% [MASK], 10% random, 10% kept);
                    summed CE over the masked tokens
  reward, dpo       preference pairs; see training/preference_stages.py

`loss_sum(model, batch)` returns (sum of the loss terms, number of terms) and `count(batch)` the
number of terms a batch holds, so the loop can normalise a whole optimizer step exactly. It may return
a third item, a dict of other per-term sums (e.g. pairs ranked right), which the loop logs as means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from tunelab.data.build import DataBundle
from tunelab.training.loss import token_loss_sum


@dataclass
class Stage:
    name: str
    load_model: Callable  # (cfg, device) -> (model, tokenizer)
    build_data: Callable  # (cfg, tokenizer) -> DataBundle
    collate: Callable  # (examples, pad_id) -> batch
    loss_sum: Callable  # (model, batch) -> (loss tensor, n terms[, {metric: sum over terms}])
    count: Callable  # batch -> n terms
    final_metrics: Callable | None = None  # (model, tokenizer, cfg, data, device) -> dict
    manifest: Callable | None = None  # cfg -> extra keys for final/tunelab.json
    prepare: Callable | None = None  # (model, cfg) -> None, once the method is applied, before a resume


# --------------------------------------------------------------------------- causal LM (sft, pretrain)
def _lm_load(cfg, device):
    from tunelab.models import load_model

    return load_model(cfg.model, device=device)


def _lm_data(cfg, tokenizer):
    from tunelab.data import build_datasets

    return build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage)


def _lm_collate(examples, pad_id, width=None):
    from tunelab.data import collate

    return collate(examples, pad_id, width)


def _lm_count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class RowsBundle(DataBundle):
    """A DataBundle that also keeps the dev rows the val examples came from (QA windows, seq2seq sources)."""

    val_rows: list = field(default_factory=list)


LM = Stage("lm", _lm_load, _lm_data, _lm_collate, token_loss_sum, _lm_count)


# ----------------------------------------------------------------------------------- classification
_STAGE_TASK_TYPES = {
    "classification": ("classification", "regression"),
    "extractive_qa": ("extractive_qa",),
    "seq2seq": ("seq2seq",),
}


def task_of(tcfg, stage: str = "classification"):
    """The Task a `task:` section describes for `stage`: a preset, or a custom one over the user's files."""
    from tunelab.config import ConfigError
    from tunelab.data.tasks import Task, get_task

    if tcfg.name:
        task = get_task(tcfg.name)
        if task.type not in _STAGE_TASK_TYPES.get(stage, (task.type,)):
            raise ConfigError(
                f"task.name {tcfg.name!r} is a {task.type} task; stage {stage} needs a "
                f"{' or '.join(_STAGE_TASK_TYPES[stage])} task"
            )
        return task
    if stage == "extractive_qa":
        return Task(name="custom", type="extractive_qa", main_metric="f1")
    if stage == "seq2seq":
        return Task(name="custom", type="seq2seq", main_metric="bleu")
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


def _cls_rows(tcfg, split: str, seed: int, stage: str = "classification"):
    from tunelab.data.tasks import load_split, load_task_file

    task = task_of(tcfg, stage)
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


def classification_collate(examples, pad_id):
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


def classification_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _cls_loss(model, batch):
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
    classification_collate,
    _cls_loss,
    lambda b: int(b["labels"].numel()),
    _cls_final,
    _cls_manifest,
)


# ------------------------------------------------------------------------------------ extractive QA
def _qa_load(cfg, device):
    from transformers import AutoModelForQuestionAnswering

    from tunelab.models import load_model

    task_of(cfg.task, "extractive_qa")  # a wrong preset fails before the model loads
    return load_model(cfg.model, device=device, auto_class=AutoModelForQuestionAnswering)


def qa_settings(tcfg) -> dict:
    """The pre/postprocessing settings a QA run is trained and evaluated with (kept in its manifest)."""
    return {
        "max_length": tcfg.max_length,
        "doc_stride": tcfg.doc_stride if tcfg.doc_stride is not None else tcfg.max_length // 4,
        "max_answer_tokens": tcfg.max_answer_tokens,
        "null_threshold": tcfg.null_threshold,
    }


def _qa_data(cfg, tokenizer):
    from tunelab.evaluation.qa import qa_features

    task = task_of(cfg.task, "extractive_qa")
    train_rows = _cls_rows(cfg.task, "train", cfg.training.seed, "extractive_qa")
    dev_rows = _cls_rows(cfg.task, "dev", cfg.training.seed, "extractive_qa")
    s = qa_settings(cfg.task)
    train = qa_features(train_rows, tokenizer, s["max_length"], s["doc_stride"])
    dev = qa_features(dev_rows, tokenizer, s["max_length"], s["doc_stride"])
    stats = {
        "task": task.name,
        "train_rows": len(train_rows),
        "train_windows": len(train),
        "val_rows": len(dev_rows),
        "val_windows": len(dev),
        "unanswerable_windows": sum(f["start"] == f["cls_index"] for f in train),
    }
    return RowsBundle(train=train, val=dev, stats=stats, val_rows=dev_rows)


def _qa_collate(examples, pad_id):
    from tunelab.evaluation.qa import collate_features

    return collate_features(examples, pad_id)


def _qa_loss(model, batch):
    """CE of the start position plus CE of the end position, summed over windows: 2 terms per window."""
    from tunelab.evaluation.qa import span_logits

    start, end = span_logits(model, batch)
    loss = F.cross_entropy(start, batch["start_positions"], reduction="sum") + F.cross_entropy(
        end, batch["end_positions"], reduction="sum"
    )
    return loss, 2 * batch["start_positions"].numel()


def _qa_final(model, tokenizer, cfg, data, device) -> dict:
    from tunelab.evaluation.qa import evaluate_qa

    if not data.val:
        return {}
    s = qa_settings(cfg.task)
    scores, _ = evaluate_qa(
        model, tokenizer, data.val_rows, device, s["max_length"], s["doc_stride"], s["max_answer_tokens"],
        s["null_threshold"], cfg.training.batch_size * 4, features=data.val,
    )  # fmt: skip
    return {f"dev_{k}": v for k, v in scores.items()}


def _qa_manifest(cfg) -> dict:
    task = task_of(cfg.task, "extractive_qa")
    return {"task": {"name": task.name, "type": "extractive_qa", **qa_settings(cfg.task)}}


EXTRACTIVE_QA = Stage(
    "extractive_qa",
    _qa_load,
    _qa_data,
    _qa_collate,
    _qa_loss,
    lambda b: 2 * int(b["start_positions"].numel()),
    _qa_final,
    _qa_manifest,
)


# ------------------------------------------------------------------------------------------ seq2seq
T5_PREFIXES = {"wmt14-en-de": "translate English to German: "}


def seq2seq_prefix(tcfg, model_cfg) -> str:
    """task.prefix, or (null) T5's own task prefix for a preset it knows when the model is a T5."""
    if tcfg.prefix is not None:
        return tcfg.prefix
    if tcfg.name not in T5_PREFIXES:
        return ""
    return T5_PREFIXES[tcfg.name] if _model_type(model_cfg) in ("t5", "mt5", "umt5") else ""


def _model_type(model_cfg) -> str | None:
    from transformers import AutoConfig

    from tunelab.models import resolve
    from tunelab.models.loading import _from_pretrained

    try:
        return _from_pretrained(AutoConfig.from_pretrained, resolve(model_cfg.name), model_cfg).model_type
    except Exception:  # the model load itself reports an unusable spec
        return None


def _s2s_load(cfg, device):
    from transformers import AutoModelForSeq2SeqLM

    from tunelab.models import load_model

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


def _s2s_data(cfg, tokenizer):
    task = task_of(cfg.task, "seq2seq")
    t = cfg.task
    prefix = seq2seq_prefix(t, cfg.model)
    train_rows = _cls_rows(t, "train", cfg.training.seed, "seq2seq")
    dev_rows = _cls_rows(t, "dev", cfg.training.seed, "seq2seq")
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


def _s2s_collate(examples, pad_id):
    width = max(len(e["input_ids"]) for e in examples)
    tw = max(len(e["labels"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), tw), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _s2s_loss(model, batch):
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


def _s2s_final(model, tokenizer, cfg, data, device) -> dict:
    from tunelab.evaluation.generation import generate_seq2seq, generation_scores

    if not data.val_rows:
        return {}
    s = seq2seq_settings(cfg)
    hyps = generate_seq2seq(
        model, tokenizer, [r["source"] for r in data.val_rows], s["prefix"], s["max_length"], s["max_new_tokens"],
        s["num_beams"], cfg.training.batch_size * 4, device,
    )  # fmt: skip
    scores = generation_scores(hyps, [r["target"] for r in data.val_rows], s["embedding_model"])
    return {f"dev_{k}": v for k, v in scores.items()}


def _s2s_manifest(cfg) -> dict:
    task = task_of(cfg.task, "seq2seq")
    return {"task": {"name": task.name, "type": "seq2seq", **seq2seq_settings(cfg)}}


SEQ2SEQ = Stage(
    "seq2seq",
    _s2s_load,
    _s2s_data,
    _s2s_collate,
    _s2s_loss,
    lambda b: int((b["labels"] != -100).sum()),
    _s2s_final,
    _s2s_manifest,
)


# ---------------------------------------------------------------------------------------------- MLM
def _mlm_load(cfg, device):
    from transformers import AutoModelForMaskedLM

    from tunelab.models import load_model

    model, tok = load_model(cfg.model, device=device, auto_class=AutoModelForMaskedLM)
    if tok.mask_token_id is None:
        from tunelab.config import ConfigError

        raise ConfigError(f"stage: mlm needs a tokenizer with a mask token; {cfg.model.name!r} has none")
    return model, tok


def _mlm_data(cfg, tokenizer):
    from tunelab.data import DataBundle, read_rows
    from tunelab.data.build import split_rows
    from tunelab.data.errors import DataError

    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a text file (.jsonl/.json/.csv/.tsv with a text column).")
    rows = read_rows(d.train, hub_split=d.hub_split, hub_config=d.hub_config)[: d.limit]
    if d.validation:
        train_rows, val_rows = rows, read_rows(d.validation, hub_split=d.hub_split, hub_config=d.hub_config)
    else:
        train_rows, val_rows = split_rows(rows, d.val_fraction, cfg.training.seed)

    def encode(rs):
        texts = [str(r[d.columns.text]) for _, _, r in rs if r.get(d.columns.text)]
        ids = tokenizer(texts, truncation=True, max_length=d.max_length)["input_ids"]
        special = set(tokenizer.all_special_ids)
        # the masking mask (1 = may be masked): no special tokens ([CLS], [SEP])
        return [
            {
                "input_ids": x,
                "maskable": [int(t not in special) for t in x],
                "mask_id": tokenizer.mask_token_id,
                "vocab_size": len(tokenizer),
            }  # fmt: skip
            for x in ids
            if len(x) > 1
        ]

    train, val = encode(train_rows), encode(val_rows)
    stats = {"rows_read": len(rows), "train_rows": len(train), "val_rows": len(val),
             "tokens": sum(len(e["input_ids"]) for e in train)}  # fmt: skip
    return DataBundle(train=train, val=val, stats=stats)


def mlm_collate(examples, pad_id, probability: float = 0.15):
    """DataCollatorForLanguageModeling's recipe: choose `probability` of the maskable tokens as targets;
    of those 80% become the mask token, 10% a random token, 10% stay as they are.

    The draw comes from a torch.Generator seeded by one number taken from torch's global RNG, which the
    loop snapshots into every checkpoint, so a resumed run masks its batches exactly as the first one.
    Each example carries its tokenizer's mask id and vocabulary size (the collate gets no tokenizer)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), 1
        maskable[i, :n] = torch.tensor(e["maskable"], dtype=torch.bool)
    mask_id, vocab = examples[0]["mask_id"], examples[0]["vocab_size"]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    chosen = (torch.rand(ids.shape, generator=g) < probability) & maskable
    if not chosen.any() and maskable.any():  # at least one target per batch
        chosen.view(-1)[int(maskable.view(-1).nonzero()[0])] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(0, vocab, ids.shape, generator=g)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "attention_mask": mask, "labels": labels}


def _mlm_loss(model, batch):
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


MLM = Stage("mlm", _mlm_load, _mlm_data, mlm_collate, _mlm_loss, lambda b: int((b["labels"] != -100).sum()))


def stage_for(name: str, cfg=None) -> Stage:
    """The Stage for a stage name; dpo's loss reads the config's `dpo` section, so it needs `cfg`."""
    from tunelab.training import preference_stages as P

    if name == "dpo":
        return P.dpo_stage(cfg)
    stages = {"classification": CLASSIFICATION, "extractive_qa": EXTRACTIVE_QA, "seq2seq": SEQ2SEQ, "mlm": MLM}
    stage = {**stages, "reward": P.REWARD}.get(name, LM)
    if stage is LM and cfg is not None and cfg.data.packing:
        # every packed pass max_length columns wide (they nearly are: rows are filled to it), so that all
        # passes allocate the same tensor sizes and a size-class allocator reuses them (training/memory.py)
        stage = replace(stage, collate=partial(_lm_collate, width=cfg.data.max_length))
    return stage
