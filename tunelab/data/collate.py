"""Pad a list of examples into a batch of tensors.

Packing and attention (checked against transformers 5.24, masking_utils.py): when a model is
called with position_ids and *no* attention_mask (and no cache), `_preprocess_mask_arguments`
runs `find_packed_sequence_indices(position_ids)`, which starts a new sequence wherever the
positions do not go up by 1, and `create_causal_mask` then ANDs the causal mask with
"same sequence" — block-diagonal causal attention, for eager, sdpa and flex alike (flash
attention reads the same position_ids as varlen boundaries). So packed batches carry
position_ids and deliberately no attention_mask: a 2D mask would switch that detection off.
Right padding in a packed batch gets positions 0, 1, ... so it forms its own sequence that no
real token can see. The caller must run the model with use_cache=False: Llama's forward
otherwise creates a DynamicCache, and with a cache the packed detection is skipped and the
examples would attend to each other (tests/test_data.py checks both).
"""

from __future__ import annotations

from tunelab.data.templating import IGNORE


def collate(examples: list[dict], pad_id: int, width: int | None = None) -> dict:
    """Right-pad to the longest example; a packed batch to `width` columns if that is wider (unpacked
    ones, e.g. validation rows, are not widened: that would only add padding to compute)."""
    import torch

    packed = any("position_ids" in e for e in examples)
    width = max([len(e["input_ids"]) for e in examples] + [(width or 0) if packed else 0])
    ids, labels, mask, positions = [], [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n
        ids.append(list(e["input_ids"]) + [pad_id] * pad)
        labels.append(list(e["labels"]) + [IGNORE] * pad)
        mask.append([1] * n + [0] * pad)
        positions.append(list(e.get("position_ids", range(n))) + list(range(pad)))
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
    if packed:
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    return batch


def real_tokens(examples: list[dict], batch: dict) -> int:
    """Tokens of a batch, padding excluded (packed rows carry no attention_mask to count them by)."""
    if all("input_ids" in e for e in examples):
        return sum(len(e["input_ids"]) for e in examples)
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()
