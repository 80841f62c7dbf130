"""sft and pretrain: a causal LM; rows -> token ids with a response mask; summed next-token CE.

sft trains on the responses of chat rows (the loss mask of tunelab/data/templating.py), pretrain on
every token of raw text; both come out of `build_datasets` by `cfg.stage`.
"""

from __future__ import annotations

from functools import partial

from tunelab.data import build_datasets, check_rows, collate
from tunelab.models import load_model
from tunelab.models.fingerprint import tokenizer_digest
from tunelab.models.loss import token_loss_sum
from tunelab.stages.base import Stage, require_causal


def load(cfg, device):
    model, tokenizer = load_model(cfg.model, device=device)
    require_causal(model, cfg)
    return model, tokenizer


def build(cfg, tokenizer):
    # the digest `tunelab data prepare` keys the data cache by, so that a run after it hits that cache
    return build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage,
                          fingerprint=tokenizer_digest(cfg.model))  # fmt: skip


def check(cfg) -> None:
    check_rows(cfg.data, cfg.training.seed, cfg.stage)


def count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def stage(cfg=None) -> Stage:
    width = None
    if cfg is not None and cfg.data.packing:
        # every packed pass max_length columns wide (they nearly are: rows are filled to it), so that all
        # passes allocate the same tensor sizes and a size-class allocator reuses them (accel/memory.py)
        width = cfg.data.max_length
    return Stage(
        cfg.stage if cfg is not None else "sft", load, build, partial(collate, width=width), token_loss_sum, count,
        check_data=check,
    )  # fmt: skip
