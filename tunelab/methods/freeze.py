"""Partial fine-tuning: train chosen blocks, chosen parts of them, and/or parameters matching patterns.

The classic "freeze the bottom, tune the top" recipe (Howard & Ruder 2018; Lee et al. 2019 show the
top blocks carry most of the task-specific change). Three knobs, combined:

  last_k    which blocks: the top k (None = every block, 0 = none)
  modules   which parts of those blocks: attention, ffn, norms (empty = every part); "norms",
            "embeddings" and "head" also select the matching parts outside the blocks (final norm,
            embedding tables, LM / task head)
  patterns  regexes on parameter names that train in addition

The result is a full model folder, so it loads with plain `AutoModelForCausalLM.from_pretrained`.

Tied embeddings: on models whose LM head is the input embedding (SmolLM2, the tiny test Llama, T5),
selecting "head" (or a pattern matching `lm_head`) trains that one shared matrix, so the input
embedding changes too.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.base import (
    Capabilities,
    MethodConfig,
    MethodError,
    freeze_all,
    load_full_model,
    num_blocks,
    save_full_model,
    unchanged,
)
from tunelab.models.blocks import block_index

DESCRIPTION = "the last k blocks (or their attention / ffn / norms only) and/or regex-matched parameters"
CAPABILITIES = Capabilities(mergeable=True)
INFERENCE_COST = "none"

Part = Literal["attention", "ffn", "norms", "embeddings", "head"]
BLOCK_PARTS = ("attention", "ffn", "norms")

# Name fragments per kind of sublayer, tried in this order on the lower-cased parameter name (the
# first match wins, so e.g. BERT's `attention.output.LayerNorm` is a norm and `embeddings.LayerNorm`
# belongs to the embeddings). Covers Llama-style decoders (self_attn, mlp, input_layernorm,
# post_attention_layernorm, model.norm, embed_tokens, lm_head), BERT (attention, intermediate /
# output.dense, LayerNorm, embeddings, pooler + classifier) and T5 (SelfAttention / EncDecAttention,
# DenseReluDense, layer_norm / final_layer_norm, shared, lm_head).
_PART_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("head", re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|pooler|cls)\.")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|embeddings|shared|wte|wpe|embed_positions)\.")),
    ("norms", re.compile(r"norm|\.ln_\w*\.")),  # GPT-2, GPT-J, BLOOM, Falcon name theirs ln_1, ln_2, ln_f
    ("attention", re.compile(r"\.(self_attn|attention|selfattention|encdecattention|crossattention|attn)\.")),
    ("ffn", re.compile(r"\.(mlp|intermediate|densereludense|feed_forward|ffn)\.|\.output\.dense\.")),
]


def part_of(name: str) -> str | None:
    """The kind of sublayer a parameter belongs to: attention, ffn, norms, embeddings, head (or None)."""
    low = "." + name.lower()
    for part, pattern in _PART_PATTERNS:
        if pattern.search(low):
            return part
    return None


class Config(MethodConfig):
    name: Literal["freeze"] = "freeze"
    last_k: int | None = Field(
        2, ge=0, description="Train the top k transformer blocks (0 = no block, null = every block)."
    )
    modules: list[Part] = Field(
        default_factory=list,
        description="Train only these parts of the chosen blocks: attention, ffn, norms (empty = every part). "
        "norms / embeddings / head also train the final norm, the embedding tables / the LM or task head.",
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Regexes (re.search) on parameter names that also train, e.g. ['norm', 'lm_head'].",
    )

    @model_validator(mode="after")
    def _something_trains(self):
        outside = set(self.modules) - set(BLOCK_PARTS)
        if self.last_k == 0 and not self.patterns and not outside:
            raise ValueError(
                "freeze with last_k: 0 and no patterns (nor modules norms / embeddings / head) would train nothing"
            )
        for p in self.patterns:
            re.compile(p)
        return self


def selected(name: str, cfg: Config, n_blocks: int) -> bool:
    """Whether parameter `name` trains under `cfg` on a model with `n_blocks` blocks."""
    if any(re.search(p, name) for p in cfg.patterns):
        return True
    idx = block_index(name)
    part = part_of(name)
    if idx is not None:
        first = 0 if cfg.last_k is None else n_blocks - cfg.last_k
        if cfg.last_k == 0 or idx < first:
            return False
        return not cfg.modules or part in cfg.modules
    return part in cfg.modules and part not in ("attention", "ffn")


def apply(model, cfg: Config):
    freeze_all(model)
    n = num_blocks(model)
    matched = 0
    # remove_duplicate=False: a tied `lm_head.weight` is seen under its own name too, so "head"
    # selects it (and with it the shared input embedding).
    for name, p in model.named_parameters(remove_duplicate=False):
        if selected(name, cfg, n):
            p.requires_grad_(True)
            matched += 1
    if matched == 0:
        raise MethodError(
            f"freeze: no parameter matched method.last_k={cfg.last_k} / method.modules={cfg.modules} / "
            f"method.patterns={cfg.patterns}"
        )
    return model


save, load, merge = save_full_model, load_full_model, unchanged
