"""Layer addition: train the head (and optionally new blocks stacked on top) over a frozen model.

The frozen stack is a fixed feature extractor; what trains is
  - the model's task head: an untied LM head, BERT's pooler + classifier, a `*ForSequenceClassification`
    `score`, a `qa_outputs` (see `tunelab.models.heads.with_task_head` for adding one);
  - the final norm(s) (`train_norm`);
  - `extra_blocks` new transformer blocks of the model's own block class, appended above the last one.

New blocks become ordinary layers: the config's layer count grows, so the result is a plain model
folder that `from_pretrained` loads, and a new Llama layer's `layer_idx` is its position (the KV
cache indexes it like any other). With `init: identity` (the default on pre-norm models: Llama, T5)
each new block's residual-branch output projections (o_proj / down_proj, T5's o / wo) start at zero,
so the block is the identity and step 0 equals the base model (the LLaMA Pro recipe, Wu et al.
2024, without the copy). Post-norm blocks (BERT) renormalise their output, so they cannot start as
the identity; `auto` initialises them randomly (the model's own initialiser).

Tied LM heads (SmolLM2, T5): the LM head *is* the input embedding, so it is not trained unless
`untie_head` gives the causal LM its own copy (vocab x hidden more parameters: 28.3M for SmolLM2).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tunelab.methods.base import (
    Capabilities,
    MethodConfig,
    MethodError,
    freeze_all,
    load_full_model,
    save_full_model,
    unchanged,
)
from tunelab.methods.freeze import part_of
from tunelab.models.blocks import block_index
from tunelab.models.blocks import block_lists as models_block_lists

if TYPE_CHECKING:  # torch is imported where a model is changed: the config reads `Config` without it
    import torch

DESCRIPTION = "the task / LM head, final norm and optional new blocks on top of the frozen model"
CAPABILITIES = Capabilities(mergeable=True)  # the result is a plain model (with more layers when extra_blocks > 0)
INFERENCE_COST = "the extra blocks' compute (none with extra_blocks 0)"

_POST_NORM = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "mpnet"}
_RESIDUAL_OUT = {"o_proj", "down_proj", "o", "wo", "out_proj", "c_proj", "fc2", "dense_4h_to_h"}


class Config(MethodConfig):
    name: Literal["head"] = "head"
    extra_blocks: int = Field(
        0, ge=0, description="New transformer blocks (the model's own block class) appended on top; they train."
    )
    init: Literal["auto", "identity", "random"] = Field(
        "auto",
        description="New blocks: identity (zero output projections, so step 0 = base model; pre-norm models), "
        "random (the model's initialiser), auto (identity where possible, else random).",
    )
    train_norm: bool = Field(True, description="Also train the final norm(s) above the blocks.")
    untie_head: bool = Field(
        False, description="Give a tied causal LM its own trainable LM head (a copy of the embedding)."
    )


def block_lists(model) -> list[tuple[str, torch.nn.ModuleList]]:
    """The ModuleLists holding the transformer blocks (one; two for encoder-decoders)."""
    found = models_block_lists(model)
    if not found:
        raise MethodError(f"{type(model).__name__}: could not find the transformer blocks to extend")
    return found


def _set_layer_count(model, stacks) -> None:
    """Make the configs say how many blocks there now are, so the model saves and reloads as is."""
    for name, blocks in stacks:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        cfg = getattr(parent, "config", None)
        for c in {id(c): c for c in (cfg, model.config) if c is not None}.values():
            if hasattr(c, "num_decoder_layers"):  # T5: encoder and decoder counts
                key = "num_decoder_layers" if name.startswith("decoder") and c is model.config else "num_layers"
                setattr(c, key, len(blocks))
            else:
                for key in ("num_hidden_layers", "num_layers", "n_layer"):
                    if hasattr(c, key):
                        setattr(c, key, len(blocks))
                        break
            types = getattr(c, "layer_types", None)
            if isinstance(types, list) and types and len(types) < len(blocks) and c is not None:
                c.layer_types = types + [types[-1]] * (len(blocks) - len(types))


def add_blocks(model, k: int, init: str = "auto") -> list[torch.nn.Module]:
    """Append k new blocks to every block stack; returns them (their parameters are trainable)."""
    import torch

    post_norm = getattr(model.config, "model_type", "") in _POST_NORM
    if init == "identity" and post_norm:
        raise MethodError(
            f"{model.config.model_type} blocks are post-norm (they renormalise their output), so a new block "
            "cannot start as the identity; use init: random (or auto)"
        )
    identity = init == "identity" or (init == "auto" and not post_norm)
    stacks = block_lists(model)
    ref = next(model.parameters())
    new_blocks = []
    for name, blocks in stacks:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        cfg = getattr(parent, "config", model.config)
        cls = type(blocks[-1])
        params = inspect.signature(cls.__init__).parameters
        for _ in range(k):
            kw = {}
            if "layer_idx" in params:
                kw["layer_idx"] = len(blocks)
            if "has_relative_attention_bias" in params:
                kw["has_relative_attention_bias"] = False
            block = cls(cfg, **kw)
            with torch.no_grad():
                block.apply(model._init_weights)
                if identity:
                    for mname, m in block.named_modules():
                        if isinstance(m, torch.nn.Linear) and mname.rsplit(".", 1)[-1] in _RESIDUAL_OUT:
                            m.weight.zero_()
                            if m.bias is not None:
                                m.bias.zero_()
            block.to(device=ref.device, dtype=ref.dtype).train(model.training)
            blocks.append(block)
            new_blocks.append(block)
    _set_layer_count(model, stacks)
    return new_blocks


def untie_lm_head(model) -> None:
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return  # already untied (or no LM head)
    if getattr(model.config, "model_type", "") == "t5":
        raise MethodError("untie_head is not supported for T5 (its tied head also rescales the decoder output)")
    out.weight = torch.nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False


def apply(model, cfg: Config):
    if cfg.untie_head:
        untie_lm_head(model)
    new = add_blocks(model, cfg.extra_blocks, cfg.init) if cfg.extra_blocks else []
    freeze_all(model)
    for name, p in model.named_parameters():  # a tied LM head appears once, as the embedding: not trained
        if block_index(name) is None:
            part = part_of(name)
            if part == "head" or (cfg.train_norm and part == "norms"):
                p.requires_grad_(True)
    for block in new:
        for p in block.parameters():
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise MethodError(
            f"head: nothing to train on {type(model).__name__} (tied LM head, no final norm, extra_blocks 0); "
            "set extra_blocks, untie_head or train_norm"
        )
    return model


save, load, merge = save_full_model, load_full_model, unchanged
