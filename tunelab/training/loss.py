"""The SFT / pre-training loss: summed next-token cross-entropy over label tokens.

The loop divides the sum by the label tokens of the whole optimizer step, so gradient
accumulation gives exactly the gradient of one big batch (a per-micro-batch mean would weight
short and long micro-batches differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] is what position t predicts; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over label tokens, number of label tokens)."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    target = shift_labels(batch["labels"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy per row of the batch (for tests and evaluation)."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    target = shift_labels(batch["labels"])
    ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    return ce.sum(dim=1)
