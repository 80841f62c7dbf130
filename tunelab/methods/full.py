"""Full fine-tuning: every weight trains. The result is a plain transformers model folder."""

from __future__ import annotations

from typing import Literal

from tunelab.methods.base import Capabilities, MethodConfig, load_full_model, save_full_model, unchanged

DESCRIPTION = "every weight"
CAPABILITIES = Capabilities(mergeable=True, new_tokens=True)  # nothing to merge: the result already is a plain model
INFERENCE_COST = "none"


class Config(MethodConfig):
    name: Literal["full"] = "full"


def apply(model, cfg: Config):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


save, load, merge = save_full_model, load_full_model, unchanged
