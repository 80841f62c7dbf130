"""extractive_qa: *ForQuestionAnswering; (question, context window) -> start / end token; summed CE of start
and end (2 terms per window); SQuAD EM / F1 on the dev rows at the end. Windows in, spans out:

    feats = qa_features(rows, tokenizer, max_length=384, doc_stride=128)      # sliding windows + labels
    start, end = qa_logits(model, feats, pad_id, device)                      # one row of logits per window
    preds = postprocess(rows, feats, start, end, max_answer_tokens=30, null_threshold=0.0)
    scores = metrics.squad_scores(preds, [r["answers"] for r in rows])        # exact / f1 (+ HasAns / NoAns)

Preprocessing. The question and the context are tokenised as a pair (the tokenizer's own pair format,
e.g. `[CLS] q [SEP] c [SEP]`), truncating only the context ("only_second"). A context longer than the
window is cut into several windows that overlap by `doc_stride` tokens (`return_overflowing_tokens`),
so every answer lies whole in at least one window. A window's labels are the token positions of the
answer's first and last character (from the fast tokenizer's `offset_mapping`); when the question is
unanswerable, or the answer is not wholly inside this window, both labels are the CLS position (the
SQuAD v2 convention; position 0 when the tokenizer has no CLS token). Very long questions are cut to
`max_question_tokens` so that every window keeps room for context.

Postprocessing. For each question, over all of its windows, the best valid span is the (start, end)
pair of context tokens with start <= end and end - start + 1 <= max_answer_tokens that maximises
start_logit + end_logit. The null score is start_logit[CLS] + end_logit[CLS], the lowest over the
question's windows (as in BERT's and transformers' reference SQuAD v2 code). The prediction is the
empty string (no answer) when null score > best span score + null_threshold, else the context text from
the span's first token's start offset to its last token's end offset (whitespace stripped).
`null_threshold=None` never predicts "no answer" (SQuAD v1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering

from tunelab.config import ConfigError
from tunelab.data import pad
from tunelab.metrics import squad_scores
from tunelab.models import load_model
from tunelab.stages.base import RowsBundle, Stage, check_task_files, task_of, task_rows

NEG = -1e9


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"extractive QA needs a fast (Rust) tokenizer for offset mappings; {type(tokenizer).__name__} is not. "
            "Use a model folder with a tokenizer.json."
        )


def _cut_question(question: str, tokenizer, max_tokens: int) -> str:
    question = question.lstrip()  # leading spaces waste tokens (some SQuAD questions have many)
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question
    return question[: enc["offset_mapping"][max_tokens - 1][1]]


def qa_features(
    rows: Sequence[dict],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_question_tokens: int = 64,
) -> list[dict]:
    """One feature per window: {"input_ids", ("token_type_ids"), "start", "end", "example", "cls_index",
    "offsets"}; offsets[i] is the (start, end) character span of token i in the context, or None for a
    token that is not context (question, special, padding)."""
    _require_fast(tokenizer)
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - n_special - doc_stride - 1  # question tokens that leave > doc_stride for context
    if room < 1:
        raise ConfigError(f"max_length={max_length} leaves no room for a question with doc_stride={doc_stride}")
    q_max = min(max_question_tokens, room)
    features = []
    for ex, row in enumerate(rows):
        question = _cut_question(row["question"], tokenizer, q_max)
        context = row["context"]
        enc = tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        answers, starts = row.get("answers") or [], row.get("answer_starts") or []
        span = None
        if answers:  # train on the first gold answer, as the reference SQuAD code does
            a0 = starts[0] if starts else context.find(answers[0])
            span = (a0, a0 + len(answers[0]))
        for w in range(len(enc["input_ids"])):
            ids = enc["input_ids"][w]
            seq = enc.sequence_ids(w)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq)]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            start = end = cls
            if span is not None:
                ctx = [i for i, o in enumerate(offsets) if o is not None]
                if ctx and offsets[ctx[0]][0] <= span[0] and offsets[ctx[-1]][1] >= span[1]:
                    # first token whose end passes the answer start; last token that starts before its end
                    start = next(i for i in ctx if offsets[i][1] > span[0])
                    end = next(i for i in reversed(ctx) if offsets[i][0] < span[1])
            feat = {"input_ids": ids, "start": start, "end": end, "example": ex, "cls_index": cls, "offsets": offsets}
            if "token_type_ids" in enc:
                feat["token_type_ids"] = enc["token_type_ids"][w]
            features.append(feat)
    return features


def collate_features(examples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask (/ token_type_ids) and start/end position labels."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "start_positions": torch.tensor([e["start"] for e in examples]),
        "end_positions": torch.tensor([e["end"] for e in examples]),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = pad([e["token_type_ids"] for e in examples], 0)[0]
    return batch


def span_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits in float32, padding positions set to a large negative number."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        kw["token_type_ids"] = batch["token_type_ids"]
    out = model(**kw)
    pad = batch["attention_mask"] == 0
    return out.start_logits.float().masked_fill(pad, NEG), out.end_logits.float().masked_fill(pad, NEG)


@torch.no_grad()
def qa_logits(model, features: list[dict], pad_id: int, device, batch_size: int = 32) -> tuple[list, list]:
    """Start and end logits per feature (numpy arrays of the feature's length)."""
    was_training = model.training
    model.eval()
    starts, ends = [], []
    for i in range(0, len(features), batch_size):
        chunk = features[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_features(chunk, pad_id).items()}
        s, e = span_logits(model, batch)
        for j, f in enumerate(chunk):
            n = len(f["input_ids"])
            starts.append(s[j, :n].cpu().numpy())
            ends.append(e[j, :n].cpu().numpy())
    model.train(was_training)
    return starts, ends


def best_span(offsets: list, start: np.ndarray, end: np.ndarray, max_answer_tokens: int):
    """(score, i, j) of the best valid context span of one window, or None when it has no context."""
    ctx = np.array([o is not None for o in offsets])
    if not ctx.any():
        return None
    n = len(offsets)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    valid = ctx[:, None] & ctx[None, :] & (j >= i) & (j - i < max_answer_tokens)
    scores = np.where(valid, start[:, None].astype(np.float64) + end[None, :], -np.inf)
    flat = int(np.argmax(scores))
    a, b = divmod(flat, n)
    return float(scores[a, b]), a, b


def postprocess(
    rows: Sequence[dict],
    features: Sequence[dict],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    max_answer_tokens: int = 30,
    null_threshold: float | None = 0.0,
) -> list[str]:
    """The predicted answer text per row ("" = no answer); see the module docstring for the rule."""
    best: dict[int, tuple] = {}
    null: dict[int, float] = {}
    for f, s, e in zip(features, start_logits, end_logits):
        ex = f["example"]
        s, e = np.asarray(s, dtype=np.float64), np.asarray(e, dtype=np.float64)
        c = f["cls_index"]
        null[ex] = min(null.get(ex, np.inf), float(s[c] + e[c]))
        cand = best_span(f["offsets"], s, e, max_answer_tokens)
        if cand is not None and (ex not in best or cand[0] > best[ex][0]):
            best[ex] = (cand[0], f["offsets"][cand[1]][0], f["offsets"][cand[2]][1])
    preds = []
    for ex, row in enumerate(rows):
        if ex not in best:
            preds.append("")
            continue
        score, a, b = best[ex]
        if null_threshold is not None and null.get(ex, -np.inf) > score + null_threshold:
            preds.append("")
        else:
            preds.append(row["context"][a:b].strip())
    return preds


def evaluate_qa(
    model,
    tokenizer,
    rows: Sequence[dict],
    device,
    max_length: int = 384,
    doc_stride: int = 128,
    max_answer_tokens: int = 30,
    null_threshold: float | None = 0.0,
    batch_size: int = 32,
    features: list[dict] | None = None,
) -> tuple[dict, list[str]]:
    """(SQuAD scores, predictions) of a span-QA model on rows."""
    if features is None:
        features = qa_features(rows, tokenizer, max_length, doc_stride)
    start, end = qa_logits(model, features, tokenizer.pad_token_id, device, batch_size)
    preds = postprocess(rows, features, start, end, max_answer_tokens, null_threshold)
    return squad_scores(preds, [r["answers"] for r in rows]), preds


# ----------------------------------------------------------------------------------- the stage
def load(cfg, device):
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


def build(cfg, tokenizer):
    task = task_of(cfg.task, "extractive_qa")
    train_rows = task_rows(cfg.task, "train", cfg.training.seed, "extractive_qa")
    dev_rows = task_rows(cfg.task, "dev", cfg.training.seed, "extractive_qa")
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


def loss_sum(model, batch):
    """CE of the start position plus CE of the end position, summed over windows: 2 terms per window."""
    start, end = span_logits(model, batch)
    loss = F.cross_entropy(start, batch["start_positions"], reduction="sum") + F.cross_entropy(
        end, batch["end_positions"], reduction="sum"
    )
    return loss, 2 * batch["start_positions"].numel()


def final_metrics(model, tokenizer, cfg, data, device) -> dict:
    if not data.val:
        return {}
    s = qa_settings(cfg.task)
    scores, _ = evaluate_qa(
        model, tokenizer, data.val_rows, device, s["max_length"], s["doc_stride"], s["max_answer_tokens"],
        s["null_threshold"], cfg.training.batch_size * 4, features=data.val,
    )  # fmt: skip
    return {f"dev_{k}": v for k, v in scores.items()}


def manifest(cfg) -> dict:
    task = task_of(cfg.task, "extractive_qa")
    return {"task": {"name": task.name, "type": "extractive_qa", **qa_settings(cfg.task)}}


def stage(cfg=None) -> Stage:
    return Stage(
        "extractive_qa", load, build, collate_features, loss_sum, lambda b: 2 * int(b["start_positions"].numel()),
        final_metrics, manifest, reload=lambda manifest: {"auto_class": AutoModelForQuestionAnswering},
        check_data=check_task_files("extractive_qa"),
    )  # fmt: skip
