"""The SFT / pre-training loss: summed next-token cross-entropy over label tokens.

The loop divides the sum by the label tokens of the whole optimizer step, so gradient
accumulation gives exactly the gradient of one big batch (a per-micro-batch mean would weight
short and long micro-batches differently).

Speed: the output head of a small LM is a large share of its compute (SmolLM2: 49k x 576, a
fifth of the forward FLOPs) and its logits dominate activation memory. With prompt masking most
positions carry no label, so we run the backbone, keep only the hidden states at label positions,
and apply the head there, in chunks, so the full [batch, seq, vocab] logits are never built.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from tunelab.models import attention
from tunelab.models.compact import CompactLinear, times_weight, weight_times
from tunelab.models.loading import unwrap

# label positions per chunk of logits: SmolLM2's 49k-word vocabulary makes a chunk of 256 48 MB
CHUNK = 256  # without a fused gradient: evaluation, DPO's log-probs, autocast
# the fused head + cross-entropy of training. Each chunk decodes a compact head once per product, so fewer
# chunks are faster: 128 made the head ~30% slower on a CPU core (380 label positions: 1.15 s vs 0.85).
# 192 takes as many chunks as 256 for 257-384 label positions (a 2-row pass of SmolLM2 SFT holds ~360),
# one more for 193-256 (some 1-row passes), and keeps each thread's logits buffer at 36 MB instead of 48
FUSED_CHUNK = 192

# One [FUSED_CHUNK, vocab] logits buffer per CPU dtype and thread (the parts of a pass may run in
# threads: training/threads.py), reused by every training pass. A fresh block of tens of MB can be above
# glibc's mmap threshold, so each pass would map it anew and take a page fault per 4 KiB while writing
# it: the head's matmul ran at half speed (61 GFLOP/s against 115, SmolLM2 LoRA SFT).
# GPU allocators cache blocks themselves; there the buffer is not kept.
_LOGITS: dict[tuple[torch.dtype, int], torch.Tensor] = {}


def _logits_buffer(vocab: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A [vocab, rows] buffer: the logits transposed (see _HeadCrossEntropy)."""
    if like.device.type != "cpu":
        return like.new_empty(vocab, rows)
    key = (like.dtype, threading.get_ident())
    buf = _LOGITS.get(key)
    if buf is None or buf.numel() < rows * vocab:
        _LOGITS[key] = buf = like.new_empty(max(rows, FUSED_CHUNK) * vocab)
    return buf[: rows * vocab].view(vocab, rows)


def _head_logits(weight, h: torch.Tensor) -> torch.Tensor:
    """W h^T, [vocab, len(h)], in the reused buffer; W a tensor or a CompactWeight (decoded block by block).
    On a CPU the columns are computed padded to a multiple of 8 (zero rows of h) and the view returned
    leaves the padding out: MKL runs this product at ~40 GFLOP/s a core for an odd count such as 215
    label positions and at ~64 for 216 (SmolLM2's head)."""
    n = len(h)
    if h.device.type == "cpu" and n % 8:
        padded = h.new_zeros(-(-n // 8) * 8, h.shape[1])
        padded[:n] = h
        return _head_logits(weight, padded)[:, :n]
    return weight_times(weight, h.t(), _logits_buffer(weight.shape[0], n, h))


def free_buffers() -> None:
    """Drop the reused logits buffers (the training loop calls this when it ends)."""
    _LOGITS.clear()


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] is what position t predicts; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def backbone_and_head(model):
    """(backbone, head) of a causal LM whose logits are exactly head(backbone(x)), else None.

    None sends the caller to the plain full-logits path: models that scale or soft-cap their logits,
    and prompt-learning PEFT models (prompt / prefix tuning), which change the inputs in their own
    forward.
    """
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return None
    inner = unwrap(model)
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


def _at_labels(model, batch: dict):
    """(head, hidden states at the label positions, their targets, their row numbers), or None for a
    model that does not split into backbone and head (then callers take the full-logits path)."""
    split = backbone_and_head(model)
    if split is None:
        return None
    backbone, head = split
    target = shift_labels(batch["labels"])
    inputs = model_inputs(batch)
    if "position_ids" in inputs and attention.active(model):  # packed rows: one attention call per example
        inputs.update(attention.varlen_kwargs(inputs["position_ids"]))
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    keep = target != -100
    return head, hidden[keep], target[keep], keep.nonzero()[:, 0]


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over label tokens, number of label tokens)."""
    at = _at_labels(model, batch)
    if at is None:
        target = shift_labels(batch["labels"])
        logits = model(**model_inputs(batch), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((target != -100).sum())
    head, hidden, target, _ = at
    if torch.is_grad_enabled() and _fusable(head, hidden):
        weight = head.compact if type(head) is CompactLinear else head.weight
        return _HeadCrossEntropy.apply(hidden, weight, target), int(target.numel())
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, target.numel(), CHUNK):
        loss = loss + _head_ce(head, hidden[i : i + CHUNK], target[i : i + CHUNK])
    return loss, int(target.numel())


def _fusable(head, hidden: torch.Tensor) -> bool:
    return (
        type(head) in (torch.nn.Linear, CompactLinear)
        and head.bias is None
        and hidden.dtype == (torch.float32 if type(head) is CompactLinear else head.weight.dtype)
        and not torch.is_autocast_enabled(hidden.device.type)
    )


class _HeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden W^T, target) with its gradient computed chunk by chunk in the forward pass.

    Autograd would keep every chunk's [chunk, vocab] logits (or their log-softmax) until the backward
    pass: ~150 MB for one SmolLM2 batch of 4 x 256, the largest single activation. Here each chunk's
    logits become dCE/dlogits = softmax - onehot in place, are multiplied into the input (and weight)
    gradient at once and freed; only [labels, hidden] survives to the backward pass. Same FLOPs as
    autograd's forward + backward, exact to rounding (tests/test_loss.py). Liger-Kernel's fused
    linear cross-entropy does this on GPUs with Triton; nothing maintained does it for CPU tensors.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i in range(0, target.numel(), FUSED_CHUNK):
            h, t = hidden[i : i + FUSED_CHUNK], target[i : i + FUSED_CHUNK]
            # logits transposed, [vocab, chunk] = W h^T: with the vocabulary as the long dimension of the
            # left operand the matmul runs ~1.4x faster on a CPU than h W^T (MKL, 2 cores, SmolLM2's head)
            logits = _head_logits(weight, h)
            picked = logits.gather(0, t[None, :])
            # softmax in place over the one [vocab, chunk] buffer (2.5x faster on a CPU than logsumexp
            # and a second exp), its log-normaliser lse = max + log(sum) kept for the loss
            top = logits.amax(dim=0, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=0, keepdim=True)
            loss += (top + total.log() - picked).sum()
            probs.div_(total)
            probs[t, torch.arange(len(t), device=t.device)] -= 1.0
            times_weight(probs.t(), weight, out=grad_hidden[i : i + FUSED_CHUNK])
            if grad_weight is not None:
                grad_weight.addmm_(probs, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, None if grad_weight is None else grad_weight * grad_loss, None


def row_loss_sums(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over each row's label tokens: [rows]. The same label-only head in chunks as
    `token_loss_sum`, summed per row (DPO's sequence log-probs are its negation)."""
    at = _at_labels(model, batch)
    if at is None:
        return per_example_loss(model, batch)
    head, hidden, target, row_of = at
    out = hidden.new_zeros(batch["labels"].shape[0], dtype=torch.float32)
    for i in range(0, target.numel(), CHUNK):
        ce = F.cross_entropy(head(hidden[i : i + CHUNK]).float(), target[i : i + CHUNK], reduction="none")
        out = out.index_add(0, row_of[i : i + CHUNK], ce)
    return out


def _head_ce(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy per row of the batch, from the full logits (the reference path)."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    target = shift_labels(batch["labels"])
    ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    return ce.sum(dim=1)
