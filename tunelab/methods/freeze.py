"""Partial fine-tuning: train only the last k transformer blocks and/or parameters matching patterns.

The classic "freeze the bottom, tune the top" recipe (Howard & Ruder 2018; Lee et al. 2019 show the
top blocks carry most of the task-specific change). The result is a full model folder, so it loads
with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.base import MethodConfig, block_index, freeze_all, num_blocks, save_full_model

DESCRIPTION = "the last k blocks and/or parameters matching regex patterns"
MERGEABLE = True
INFERENCE_COST = "none"


class Config(MethodConfig):
    name: Literal["freeze"] = "freeze"
    last_k: int = Field(2, ge=0, description="Train the top k transformer blocks (0 = none).")
    patterns: list[str] = Field(
        default_factory=list,
        description="Regexes (re.search) on parameter names that also train, e.g. ['norm', 'lm_head'].",
    )

    @model_validator(mode="after")
    def _something_trains(self):
        if self.last_k == 0 and not self.patterns:
            raise ValueError("freeze with last_k: 0 and no patterns would train nothing")
        for p in self.patterns:
            re.compile(p)
        return self


def apply(model, cfg: Config):
    freeze_all(model)
    first = num_blocks(model) - cfg.last_k
    compiled = [re.compile(p) for p in cfg.patterns]
    matched = 0
    for name, p in model.named_parameters():
        idx = block_index(name)
        if (cfg.last_k and idx is not None and idx >= first) or any(r.search(name) for r in compiled):
            p.requires_grad_(True)
            matched += 1
    if matched == 0:
        raise ValueError(f"freeze: no parameter matched last_k={cfg.last_k} / patterns={cfg.patterns}")
    return model


def save(model, out_dir) -> None:
    save_full_model(model, out_dir)


def load(base_model, out_dir):
    return type(base_model).from_pretrained(out_dir, dtype=base_model.dtype)


def merge(model):
    return model
