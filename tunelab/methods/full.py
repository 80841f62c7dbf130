"""Full fine-tuning: every weight trains. The result is a plain transformers model folder."""

from __future__ import annotations

from typing import Literal

from tunelab.methods.base import MethodConfig, save_full_model

DESCRIPTION = "every weight"
MERGEABLE = True  # nothing to merge: the result already is a plain model
INFERENCE_COST = "none"


class Config(MethodConfig):
    name: Literal["full"] = "full"


def apply(model, cfg: Config):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model, out_dir) -> None:
    save_full_model(model, out_dir)


def load(base_model, out_dir):
    return type(base_model).from_pretrained(out_dir, dtype=base_model.dtype)


def merge(model):
    return model
