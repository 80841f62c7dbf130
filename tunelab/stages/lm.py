"""sft and pretrain: a causal LM; rows -> token ids with a response mask; summed next-token CE.

sft trains on the responses of chat rows (the loss mask of tunelab/data/templating.py), pretrain on
every token of raw text; both come out of `build_datasets` by `cfg.stage`. pretrain on a plain-text
corpus (data.train: .txt files) cuts it into blocks instead, scores the held-out tail per character
beside character n-gram models, and writes generation samples at every evaluation; with
`model.architecture` the model is built from scratch (stages/pretraining.py, docs/pretraining.md).
"""

from __future__ import annotations

from functools import partial

from tunelab.data import build_datasets, check_rows, collate
from tunelab.models import load_model
from tunelab.models.fingerprint import tokenizer_digest
from tunelab.models.loss import token_loss_sum
from tunelab.stages import pretraining as pt
from tunelab.stages.base import Stage, require_causal


def load(cfg, device):
    if cfg.model.architecture:
        from transformers import AutoModelForCausalLM

        model, tokenizer = pt.load_scratch(cfg, device, AutoModelForCausalLM)
    else:
        model, tokenizer = load_model(cfg.model, device=device)
    require_causal(model, cfg)
    return model, tokenizer


def corpus(cfg) -> bool:
    """stage pretrain on .txt files: the plain-text corpus path."""
    return cfg.stage == "pretrain" and pt.plain_text(cfg)


def build(cfg, tokenizer):
    if corpus(cfg):
        return pt.build_causal(cfg, tokenizer)
    # the digest `tunelab data prepare` keys the data cache by, so that a run after it hits that cache
    return build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage,
                          fingerprint=tokenizer_digest(cfg.model))  # fmt: skip


def check(cfg) -> None:
    if corpus(cfg):
        pt.check_corpus(cfg)
        return
    check_rows(cfg.data, cfg.training.seed, cfg.stage)


def count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def stage(cfg=None) -> Stage:
    width = None
    if cfg is not None and cfg.data.packing:
        # every packed pass max_length columns wide (they nearly are: rows are filled to it), so that all
        # passes allocate the same tensor sizes and a size-class allocator reuses them (accel/memory.py)
        width = cfg.data.max_length
    on_corpus = cfg is not None and corpus(cfg)
    final_metrics = samples = None
    if on_corpus:
        batch = partial(collate, width=None)

        def final_metrics(model, tokenizer, cfg, data, device):
            return pt.causal_metrics(model, tokenizer, data, device, batch, token_loss_sum)

        samples = pt.samples
    return Stage(
        cfg.stage if cfg is not None else "sft", load, build, partial(collate, width=width), token_loss_sum, count,
        final_metrics, check_data=check, samples=samples,
    )  # fmt: skip
