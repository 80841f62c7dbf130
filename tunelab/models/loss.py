"""The SFT / pre-training loss: summed next-token cross-entropy over label tokens.

The loop divides the sum by the label tokens of the whole optimizer step, so gradient
accumulation gives exactly the gradient of one big batch (a per-micro-batch mean would weight
short and long micro-batches differently).

The output head of a small LM is a large share of its compute (SmolLM2: 49k x 576, a fifth of the
forward FLOPs) and its logits dominate activation memory. With prompt masking most positions carry
no label, so we run the backbone, keep only the hidden states at label positions, and apply the
head there, in chunks, so the full [batch, seq, vocab] logits are never built.

Prompt and prefix tuning (PEFT prompt-learning models) change the inputs inside PEFT's own forward, so the
backbone cannot be called directly: their forward runs as PEFT writes it, with `logits_to_keep=1` (the head on
one position), and the backbone's output is taken from a forward hook (`virtual_token_split`); the head is then
applied at the label positions as for any other model. Their logits were the full [batch, seq, vocab] before.

This is the plain path. The speed path (tunelab/accel, `training.accelerate: auto`) plugs in at two
points, through attributes it sets on the model (PACKED_INPUTS, FUSED_HEAD below).
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING

from tunelab.models.loading import soft_prompt, unwrap

if TYPE_CHECKING:  # torch is imported where a model runs: the config check reads this module without it
    import torch

CHUNK = 256  # label positions per chunk of logits: SmolLM2's 49k-word vocabulary makes a chunk 48 MB

# ---- where tunelab.accel plugs in. models never imports accel (accel imports models, so the dependency points
# one way): accel sets these attributes on the transformers model it prepares (training.accelerate: auto), and
# the loss below uses them when they are there. Without them (accelerate: off, or a model tunelab did not
# prepare) the loss is plain PyTorch.
PACKED_INPUTS = "tunelab_packed_inputs"  # position_ids -> forward kwargs: packed examples' bounds (accel/attention.py)
FUSED_HEAD = "tunelab_fused_head"  # (head, hidden, target) -> summed CE, gradient made in the forward (accel/head.py)
PACKED_WIDTH = "tunelab_packed_width"  # (tokens, a weight) -> the width an unpadded row is padded to (accel/memory.py)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] is what position t predicts; the last position predicts nothing."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=-100)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def backbone_and_head(model):
    """(backbone, head) of a causal LM whose logits are exactly head(backbone(x)), else None.

    None sends the caller to the plain full-logits path: models that scale or soft-cap their logits,
    and prompt-learning PEFT models (prompt / prefix tuning), which change the inputs in their own
    forward (`virtual_token_split` covers those).
    """
    if _prompt_learning(model):
        return None
    return _causal_split(unwrap(model))


def virtual_token_split(model):
    """(backbone, head) of a prompt- or prefix-tuned PEFT causal LM whose logits are head(backbone output), the
    virtual positions (prompt tuning prepends them to the inputs) first; else None.

    Its forward must run as PEFT writes it (the soft prompt or the key/value prefix goes in there), so the
    caller runs it with `logits_to_keep=1` and reads the backbone's output from a hook (`at_labels`)."""
    import inspect

    if soft_prompt(model) is None:  # other prompt-learning types (p-tuning, ...) keep the full logits
        return None
    inner = unwrap(model)
    split = _causal_split(inner)
    if split is None or "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    return split


def _prompt_learning(model) -> bool:
    peft_cfg = getattr(model, "active_peft_config", None)
    return peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False)


def _causal_split(inner):
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if not type(inner).__name__.endswith("ForCausalLM"):
        return None
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        return None
    return backbone, head


def at_labels(model, batch: dict):
    """(head, hidden states at the label positions, their targets, their row numbers), or None for a
    model that does not split into backbone and head (then callers take the full-logits path)."""
    split = backbone_and_head(model)
    if split is None:
        return _virtual_at_labels(model, batch)
    backbone, head = split
    # accel: the rows end to end, one attention call each
    if (ran := end_to_end_hidden(model, backbone, batch)) is not None:
        return _labelled(head, *ran, batch)
    inputs = model_inputs(batch)
    if "position_ids" in inputs:  # accel: one attention call per packed example
        inputs.update(packed_kwargs(model, inputs["position_ids"]))
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return _labelled(head, hidden, None, batch)


def end_to_end_hidden(model, backbone, batch: dict):
    """`backbone`'s last hidden states of a right-padded batch's rows laid end to end, one attention call each, no
    compute on padding ([width, hidden]), and [rows, columns] -> each row token's position among them; or None where
    accel's packed attention is not installed, or the rows are packed or not right-padded (`_unpadded`)."""
    plan = _unpadded(model, batch)
    if plan is None:
        return None
    positions, kwargs, at = plan
    ids = _end_to_end(batch, positions.shape[1])
    return backbone(input_ids=ids, position_ids=positions, **kwargs, use_cache=False).last_hidden_state[0], at


def last_token_scores(model, batch: dict):
    """A *ForSequenceClassification decoder's logits of a right-padded batch: its `score` head at each row's last
    token, as transformers takes it (the rightmost that is not the pad id). Where accel's packed attention runs, the
    rows are laid end to end (`end_to_end_hidden`: no compute on padding); else, and for any other model (an
    encoder's pooled head), the model's own forward over the padded batch."""
    import torch

    split = score_head_split(model)
    pad_id = unwrap(model).config.pad_token_id
    ran = end_to_end_hidden(model, split[0], batch) if split is not None and pad_id is not None else None
    if ran is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hidden, at = ran
    ids = batch["input_ids"]
    last = (torch.arange(ids.shape[1], device=ids.device) * (ids != pad_id)).argmax(-1)
    return split[1](hidden[at[torch.arange(len(ids), device=ids.device), last]])


def score_head_split(model):
    """(backbone, score head) of a decoder *ForSequenceClassification whose scores are score(backbone(x)), else None."""
    inner = unwrap(model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = getattr(inner, "score", None)
    # transformers names a decoder's scalar head `score` (Llama, Mistral, Qwen, GPT-2 ...), an encoder's `classifier`
    if not type(inner).__name__.endswith("ForSequenceClassification") or backbone is None or head is None:
        return None
    return backbone, head


def _labelled(head, hidden, at, batch: dict):
    """at_labels' answer: the hidden states [rows, columns, hidden] (at None) at `batch`'s label positions, or of rows
    laid end to end ([width, hidden]; `at`: [rows, columns] -> their flattened positions, `_unpadded`)."""
    target = shift_labels(batch["labels"])
    keep = target != -100
    return head, hidden[keep] if at is None else hidden[at[keep]], target[keep], keep.nonzero()[:, 0]


def packed_kwargs(model, position_ids) -> dict:
    """The forward's keyword arguments that give packed rows (positions restarting at each example) one attention
    call per example where accel installed it (PACKED_INPUTS); {} otherwise (the block-diagonal mask then)."""
    packed_inputs = getattr(unwrap(model), PACKED_INPUTS, None)
    return {} if packed_inputs is None else packed_inputs(position_ids)


def _unpadded(model, batch: dict, virtual: int = 0, first: int = 0):
    """Right-padded rows laid end to end in one row, each after `virtual` positions of its own (prompt tuning's soft
    prompt), for a model whose attention takes packed examples (accel: PACKED_INPUTS): no compute on padding.
    (position ids [1, width], the forward's packed-attention kwargs, [rows, columns] -> the flattened position of
    each row's token), or None: no packed attention, no attention mask, packed rows, or a row not right-padded.
    The positions restart at each row (and for the padding after the last one), as in packed SFT rows, at `first`
    (prefix tuning's rows start after the prefix's positions)."""
    import torch

    inner = unwrap(model)
    packed_inputs = getattr(inner, PACKED_INPUTS, None)
    mask = batch.get("attention_mask")
    if packed_inputs is None or mask is None or "position_ids" in batch:
        return None
    rows, columns = mask.shape
    lengths = mask.sum(1)
    if not torch.equal(mask, (torch.arange(columns, device=mask.device) < lengths[:, None]).to(mask.dtype)):
        return None
    spans = (lengths + virtual).tolist()
    total = sum(spans)
    weight = inner.get_input_embeddings().weight
    width = getattr(inner, PACKED_WIDTH, lambda n, _: n)(total, weight)
    positions = torch.cat([torch.arange(n) for n in spans] + [torch.arange(width - total)]).to(mask.device)[None]
    starts = torch.cumsum(torch.tensor([0] + spans[:-1], device=mask.device), 0)
    at = starts[:, None] + virtual + torch.arange(columns, device=mask.device)
    return positions + first, packed_inputs(positions), at


def _full_attention(model) -> bool:
    """Whether every layer of `model` attends to every earlier position (no sliding window)."""
    inner = unwrap(model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    kinds = getattr(config, "layer_types", None)
    return all(k == "full_attention" for k in kinds) if kinds else not getattr(config, "sliding_window", None)


def _end_to_end(batch: dict, width: int):
    """The right-padded rows' tokens end to end in one row [1, width], zeros after them (`_unpadded`'s layout)."""
    import torch.nn.functional as F

    ids = batch["input_ids"][batch["attention_mask"].bool()]
    return F.pad(ids, (0, width - len(ids)))[None]


def _virtual_at_labels(model, batch: dict):
    """at_labels of a prompt- / prefix-tuned model: PEFT's forward with the head on one position, the
    backbone's output caught by a hook, the virtual positions (however many the output has beyond the
    inputs: none for prefix tuning or with the adapter disabled) dropped."""
    import torch

    split = virtual_token_split(model)
    if split is None:
        return None
    backbone, head = split
    peft_cfg = model.active_peft_config
    enabled = getattr(model.forward, "__self__", None) is model  # PEFT's disable_adapter swaps the forward
    if not enabled and (ran := end_to_end_hidden(model, backbone, batch)) is not None:
        # accel: the adapter off (dpo's reference pass) runs the base model as it is: its rows end to end too
        return _labelled(head, *ran, batch)
    if enabled and peft_cfg.peft_type == "PROMPT_TUNING":
        plan = _unpadded(model, batch, peft_cfg.num_virtual_tokens)
        if plan is not None:  # accel: each row after its soft prompt, end to end, as PEFT's forward lays out one row
            positions, kwargs, at = plan
            embeds = model.word_embeddings(batch["input_ids"])
            prompts = model.get_prompt(batch_size=len(embeds)).to(embeds.dtype)
            real = batch["attention_mask"].bool()
            parts = [t for r in range(len(embeds)) for t in (prompts[r], embeds[r][real[r]])]
            flat = torch.cat(parts)
            flat = torch.cat([flat, flat.new_zeros(positions.shape[1] - len(flat), flat.shape[1])])[None]
            hidden = backbone(inputs_embeds=flat, position_ids=positions, **kwargs, use_cache=False).last_hidden_state
            return _labelled(head, hidden[0], at, batch)
    # (transformers' checkpointed layers drop the cache the prefix comes in: the config refuses that pairing)
    if (
        enabled
        and peft_cfg.peft_type == "PREFIX_TUNING"
        and _full_attention(model)
        and not backbone.gradient_checkpointing
    ):
        plan = _unpadded(model, batch, first=peft_cfg.num_virtual_tokens)
        cache = None if plan is None else model.get_prompt(batch_size=1)
        if type(cache).__name__ == "DynamicCache":  # accel: the rows end to end, each after the one prefix
            positions, kwargs, at = plan  # (accel/attention.py: its keys before every example's own)
            ids = _end_to_end(batch, positions.shape[1])
            named = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
            out = backbone(input_ids=ids, position_ids=positions, **{named: cache}, **kwargs, use_cache=False)
            return _labelled(head, out.last_hidden_state[0], at, batch)
    seen, me = [], threading.get_ident()

    def catch(module, args, out):
        if threading.get_ident() == me:  # thread shares (accel/threads.py) run the same backbone in other threads
            seen.append(out.last_hidden_state)

    hook = backbone.register_forward_hook(catch)
    try:
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = seen[-1]
    return _labelled(head, hidden[:, hidden.shape[1] - batch["labels"].shape[1] :], None, batch)


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over label tokens, number of label tokens)."""
    import torch
    import torch.nn.functional as F

    at = at_labels(model, batch)
    if at is None:
        target = shift_labels(batch["labels"])
        logits = model(**model_inputs(batch), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((target != -100).sum())
    head, hidden, target, _ = at
    fused_head = getattr(unwrap(model), FUSED_HEAD, None)
    if torch.is_grad_enabled() and fused_head is not None:  # accel: head + CE with its gradient, no logits kept
        loss = fused_head(head, hidden, target)
        if loss is not None:  # None: a head it does not cover (a bias, autocast ...)
            return loss, int(target.numel())
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, target.numel(), CHUNK):
        loss = loss + _head_ce(head, hidden[i : i + CHUNK], target[i : i + CHUNK])
    return loss, int(target.numel())


def row_loss_sums(model, batch: dict, fp32_logits: bool = False) -> torch.Tensor:
    """Summed cross-entropy over each row's label tokens: [rows]. The same label-only head in chunks as
    `token_loss_sum`, summed per row (DPO's sequence log-probs are its negation). `fp32_logits` (scoring): a
    16-bit head's logits computed in fp32 (models/precision.py `fp32_head`), not rounded to 16 bits first."""
    import torch
    import torch.nn.functional as F

    from tunelab.models.precision import fp32_head

    at = at_labels(model, batch)
    if at is None:
        return per_example_loss(model, batch)
    head, hidden, target, row_of = at
    logits = (lambda h: fp32_head(head, h)) if fp32_logits else head
    out = hidden.new_zeros(batch["labels"].shape[0], dtype=torch.float32)
    for i in range(0, target.numel(), CHUNK):
        ce = F.cross_entropy(logits(hidden[i : i + CHUNK]).float(), target[i : i + CHUNK], reduction="none")
        out = out.index_add(0, row_of[i : i + CHUNK], ce)
    return out


def _head_ce(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy per row of the batch, from the full logits (the reference path)."""
    import torch.nn.functional as F

    logits = model(**model_inputs(batch), use_cache=False).logits
    target = shift_labels(batch["labels"])
    ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    return ce.sum(dim=1)
