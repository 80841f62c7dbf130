"""distill: a causal LM (the student: the run's model, any method) learns a teacher's next-token distribution.

    L = alpha * tau^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE(labels, p_S)      per label token, summed

The teacher (`distill.teacher`: a model spec or a finished run folder) runs once, before training, over
every train and validation example, unpacked, one example at a time in effect (order-independent: an
example's rows do not depend on its batch). Its top-k token ids (int32) and log-probs at tau (float16) at
each label position go to RUN/distill/teacher-KEY.safetensors, KEY a hash of (teacher, data, k, tau); a
resume or a rerun finds the file and never loads the teacher. Then the teacher is freed.

Each example carries its rows of the cache (views, no copy); collate concatenates them in the order the
loss visits label positions (row by row, left to right), so the loss needs nothing but the batch.

The top-k target keeps the teacher's own probabilities at its k tokens plus one "other" bucket holding the
rest of its mass; the student's distribution is read the same way (its full-vocabulary softmax at tau at
the k ids, and its mass elsewhere). Renormalising the teacher over its top-k instead was measured to be
wrong at scale: SmolLM2's top 64 at tau 2 hold ~40% of its mass, and a student equal to its teacher then
scored a KL of 0.89 nats and was pushed to sharpen. docs/distillation.md has the maths, the truncation
error and why forward KL.

Why not TRL's GKDTrainer: a transformers Trainer with its own loop, and it runs the teacher at every step;
here the loss is a few lines on the project's loop, and the teacher runs once.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.config import ConfigError, ModelConfig
from tunelab.data import build_datasets, check_rows, collate
from tunelab.models import load_model, load_tokenizer, resolve_device
from tunelab.models.loss import CHUNK, at_labels, model_inputs, shift_labels
from tunelab.stages.base import Stage, require_causal
from tunelab.stages.runs import load_run, result_dir, run_manifest

log = logging.getLogger("tunelab.stages.distill")
TEACHER_BATCH = 8  # examples per teacher forward pass while filling the cache


# ---------------------------------------------------------------------------------------------- the loss
def distill_terms(logits, target, teacher_ids, teacher_logps, tau: float):
    """Per label token: (KL of the teacher's top-k + "other" bucket against the student's, hard-label CE at tau 1).

    logits [N, V] (the student's), target [N], teacher_ids [N, k] (long), teacher_logps [N, k] (the teacher's
    full-vocabulary log-softmax at tau at those ids). Both distributions are read over k + 1 outcomes: the
    k ids and "any other token" (teacher mass eps = 1 - sum of its top-k; the student's the same way), so the
    KL is 0 when the student equals the teacher and is the exact KL when k covers the vocabulary."""
    logits = logits.float()
    scaled = logits / tau
    log_z = scaled.logsumexp(-1)
    student = scaled.gather(-1, teacher_ids) - log_z[:, None]
    t_logp = teacher_logps.float()
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - student)).sum(-1)
    if teacher_ids.shape[-1] < logits.shape[-1]:  # else no bucket (and rounding must not invent one)
        # the student's mass off the top-k from its own logits: 1 - sum(top-k) would cancel catastrophically
        other_s = scaled.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1) - log_z
        eps = (1 - t_p.sum(-1)).clamp(min=0)
        kl = kl + torch.xlogy(eps, eps) - eps * other_s
    ce = F.cross_entropy(logits, target, reduction="none")
    return kl, ce


def distill_loss_fn(tau: float, alpha: float, state: dict):
    """loss_sum for the loop: summed over label tokens; extras kl and ce (sums; the loop divides by the count).
    state["vocab"] (set when the data is built): the tokenizer's size, where both distributions are compared
    (embedding rows past it, padding for speed, are no token)."""

    def loss_sum(model, batch):
        vocab = state.get("vocab")
        t_ids, t_logps = batch["teacher_ids"].long(), batch["teacher_logps"]
        at = at_labels(model, batch)
        if at is None:  # prompt-learning methods, soft-capped logits: the full logits at the label positions
            target = shift_labels(batch["labels"])
            keep = target != -100
            logit_chunks = [model(**model_inputs(batch), use_cache=False).logits[keep]]
            target, step = target[keep], target.numel()
        else:
            head, hidden, target, _ = at
            logit_chunks = (head(hidden[i : i + CHUNK]) for i in range(0, target.numel(), CHUNK))
            step = CHUNK
        if target.numel() != t_ids.shape[0]:
            raise RuntimeError(f"distill: {target.numel()} label positions but {t_ids.shape[0]} cached teacher rows")
        kl_sum = ce_sum = t_logps.new_zeros((), dtype=torch.float32)
        for n, logits in enumerate(logit_chunks):
            rows = slice(n * step, (n + 1) * step)
            logits = logits[:, :vocab] if vocab else logits
            kl, ce = distill_terms(logits, target[rows], t_ids[rows], t_logps[rows], tau)
            kl_sum, ce_sum = kl_sum + kl.sum(), ce_sum + ce.sum()
        loss = alpha * tau**2 * kl_sum + (1 - alpha) * ce_sum
        return loss, int(target.numel()), {"kl": kl_sum.detach(), "ce": ce_sum.detach()}

    return loss_sum


def count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def collate_with_teacher(examples: list[dict], pad_id: int) -> dict:
    """The sft batch plus the examples' cached teacher rows, concatenated in label-position order."""
    batch = collate([{k: e[k] for k in ("input_ids", "labels")} for e in examples], pad_id)
    batch["teacher_ids"] = torch.cat([e["teacher_ids"] for e in examples])
    batch["teacher_logps"] = torch.cat([e["teacher_logps"] for e in examples])
    return batch


# ---------------------------------------------------------------------------------------------- the teacher
def teacher_tokenizer(spec: str):
    """The tokenizer the teacher was trained with: a run's own (final/), its base model's, or the spec's."""
    final = result_dir(spec)
    if final is None:
        return load_tokenizer(ModelConfig(name=spec))
    if (final / "tokenizer_config.json").is_file():
        return load_tokenizer(ModelConfig(name=str(final)))
    manifest = run_manifest(spec)
    return load_tokenizer(ModelConfig(**{**manifest["base_model"], "trust_remote_code": False}))


def check_same_tokenizer(cfg, student_tok=None, teacher_tok=None) -> None:
    """One named error when teacher and student would not read the same token ids the same way."""
    student_tok = student_tok or load_tokenizer(cfg.model)
    teacher_tok = teacher_tok or teacher_tokenizer(cfg.distill.teacher)
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    problem = None
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()), key=lambda kv: kv[1])[:3]
        problem = (f"their vocabularies differ ({len(s)} vs {len(t)} tokens; e.g. "
                   + ", ".join(f"{k!r}->{v}" for k, v in differ) + ")")  # fmt: skip
    elif (student_tok.chat_template or "") != (teacher_tok.chat_template or ""):
        problem = "their chat templates differ"
    if problem:
        raise ConfigError(
            f"distill.teacher {cfg.distill.teacher!r} and model.name {cfg.model.name!r}: {problem}. Distillation "
            "compares the two models token by token, so they need the same tokenizer: pick a student of the "
            "teacher's family (same tokenizer files), or a teacher whose tokenizer is the student's."
        )


def _fingerprint(spec: str) -> dict:
    """What identifies the teacher's weights: a run's manifest and weight files, a folder's files, a Hub id."""
    final = result_dir(spec)
    folder = final if final is not None else Path(spec)
    if folder.is_dir():
        return {"spec": spec, "files": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                              for p in folder.iterdir() if p.is_file())}  # fmt: skip
    return {"spec": spec}


def _data_hash(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([list(e["input_ids"]), list(e["labels"])]).encode())
    return h.hexdigest()


def cache_key(cfg, train: list[dict], val: list[dict]) -> str:
    d = cfg.distill
    parts = {"teacher": _fingerprint(d.teacher), "train": _data_hash(train), "val": _data_hash(val),
             "k": d.top_k, "tau": d.temperature}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def teacher_topk(teacher, examples: list[dict], k: int, tau: float, pad_id: int, vocab: int, device) -> dict:
    """The teacher's top-k at each label position of each example: ids [N, k] int32, logps [N, k] float16
    (log-softmax at tau over the first `vocab` logits), offsets [examples + 1] (example i owns rows
    offsets[i]:offsets[i+1])."""
    ids, logps, counts = [], [], []
    k = min(k, vocab)
    for j in range(0, len(examples), TEACHER_BATCH):
        batch = collate([{k_: e[k_] for k_ in ("input_ids", "labels")} for e in examples[j : j + TEACHER_BATCH]],
                        pad_id)  # fmt: skip
        target = shift_labels(batch["labels"])
        keep = target != -100
        logits = teacher(**model_inputs({k_: v.to(device) for k_, v in batch.items()}), use_cache=False).logits
        lp = F.log_softmax(logits[keep.to(device)][:, :vocab].float() / tau, dim=-1)
        top = lp.topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        # float16 keeps log-probs to ~1e-3 relative; far-tail values below its range are clamped
        logps.append(top.values.clamp(min=-6e4).to(torch.float16).cpu())
        counts += keep.sum(1).tolist()
    offsets = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
    empty = torch.zeros((0, k))
    return {"ids": torch.cat(ids) if ids else empty.to(torch.int32),
            "logps": torch.cat(logps) if logps else empty.to(torch.float16), "offsets": offsets}  # fmt: skip


def load_teacher(spec: str, device):
    model, _ = load_run(spec, device=str(device), merge=True)
    model.eval().requires_grad_(False)
    return model


def teacher_cache(cfg, train: list[dict], val: list[dict], pad_id: int, vocab: int) -> dict:
    """{"train": {...}, "val": {...}} as teacher_topk returns them: read from RUN/distill/ when the same
    teacher, data, k and tau were cached before, else computed (the teacher loaded, run once, freed)."""
    from safetensors.torch import load_file, save_file

    d = cfg.distill
    path = Path(cfg.output_dir) / "distill" / f"teacher-{cache_key(cfg, train, val)}.safetensors"
    if d.cache and path.is_file():
        log.info("distill: teacher top-k read from %s", path)
        flat = load_file(str(path))
        return {s: {n: flat[f"{s}.{n}"] for n in ("ids", "logps", "offsets")} for s in ("train", "val")}
    device = resolve_device(cfg.training.device)
    teacher = load_teacher(d.teacher, device)
    out = {s: teacher_topk(teacher, ex, d.top_k, d.temperature, pad_id, vocab, device)
           for s, ex in (("train", train), ("val", val))}  # fmt: skip
    del teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if d.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = {"teacher": d.teacher, "top_k": str(d.top_k), "temperature": str(d.temperature)}
        save_file({f"{s}.{n}": t.contiguous() for s, part in out.items() for n, t in part.items()}, str(tmp), meta)
        os.replace(tmp, path)  # whole or absent, also with several processes writing
        log.info("distill: teacher top-k written to %s", path)
    return out


def attach(examples: list[dict], part: dict) -> list[dict]:
    """Each example with its rows of the cache (views into the cached tensors)."""
    off = part["offsets"].tolist()
    return [{**e, "teacher_ids": part["ids"][off[i] : off[i + 1]], "teacher_logps": part["logps"][off[i] : off[i + 1]]}
            for i, e in enumerate(examples)]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the stage
def data_stage(cfg) -> str:
    return "pretrain" if cfg.data.format == "text" else "sft"


def check(cfg) -> None:
    """Before the model loads: the rows, and the teacher's tokenizer against the student's."""
    check_rows(cfg.data, cfg.training.seed, data_stage(cfg))
    check_same_tokenizer(cfg)


def load(cfg, device):
    model, tokenizer = load_model(cfg.model, device=device)
    require_causal(model, cfg)
    return model, tokenizer


def stage(cfg=None) -> Stage:
    state: dict = {}

    def build(cfg, tokenizer):
        state["vocab"] = len(tokenizer)
        data = build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=data_stage(cfg))
        cache = teacher_cache(cfg, data.train, data.val, tokenizer.pad_token_id, state["vocab"])
        data.train, data.val = attach(data.train, cache["train"]), attach(data.val, cache["val"])
        data.stats["teacher_rows"] = int(cache["train"]["ids"].shape[0])
        return data

    # cfg None: load_run rebuilding a distilled run's base, where only the model class matters
    loss = None if cfg is None else distill_loss_fn(cfg.distill.temperature, cfg.distill.alpha, state)
    return Stage(
        "distill", load, build, collate_with_teacher, loss, count,
        manifest=lambda c: {"distill": c.distill.model_dump()}, check_data=check,
    )  # fmt: skip
