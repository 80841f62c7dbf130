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

import contextlib
import contextvars

from tunelab.data.templating import IGNORE

# a batch key the training loop sets on a multi-process run's stand-in batch (an empty shard of a micro-batch runs its
# first row with weight 0, training/distributed.py `shard`): a loss with a statistic over every process's rows
# (kto's z_ref) leaves such a batch's rows out of it
STAND_IN = "tunelab_stand_in"

# the multiple every padded width is rounded up to, within `widths_rounded_to` (1: the longest sequence's width)
_MULTIPLE = contextvars.ContextVar("tunelab_pad_multiple", default=1)


@contextlib.contextmanager
def widths_rounded_to(multiple: int):
    """Within it, every batch `pad` builds is as wide as its longest sequence (or the width asked for) rounded up
    to a multiple of `multiple`: the extra columns are padding like any other. For kernels that keep something
    per shape (tunelab/accel/memory.py, `shape_bucket`); the training loop sets it, nothing else needs to."""
    token = _MULTIPLE.set(max(1, int(multiple)))
    try:
        yield
    finally:
        _MULTIPLE.reset(token)


def pad(seqs, value: int, side: str = "right", width: int | None = None, dtype=None):
    """Pad sequences into one [len(seqs), width] tensor; returns (padded, mask).

    `seqs` are lists (or 1-D tensors) of numbers; `value` fills the padding (a pad token id, -100 for
    labels, 0 for a mask); `side` "right" puts each sequence at the start of its row, "left" at the end
    (what a decoder-only model's generate wants). `width` defaults to the longest sequence; a fixed
    `width` shorter than a sequence is an error; inside `widths_rounded_to(m)` either is rounded up to a
    multiple of m. `dtype` defaults to torch.long. The mask is long, 1 on
    each sequence's own positions and 0 on the padding. Every batch tunelab builds is padded here."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"pad: side must be 'right' or 'left', not {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"pad: a sequence of {longest} does not fit in width {width}")
    width = -(-width // _MULTIPLE.get()) * _MULTIPLE.get()
    dtype = torch.long if dtype is None else dtype
    out = torch.full((len(seqs), width), value, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        out[i, cols] = torch.as_tensor(s, dtype=dtype)
        mask[i, cols] = 1
    return out, mask


def collate(examples: list[dict], pad_id: int, width: int | None = None) -> dict:
    """Right-pad to the longest example; a packed batch to `width` columns if that is wider (unpacked
    ones, e.g. validation rows, are not widened: that would only add padding to compute)."""
    packed = any("position_ids" in e for e in examples)
    width = max([len(e["input_ids"]) for e in examples] + [(width or 0) if packed else 0])
    ids, mask = pad([e["input_ids"] for e in examples], pad_id, width=width)
    labels, _ = pad([e["labels"] for e in examples], IGNORE, width=width)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = packed_positions([e.get("position_ids", range(len(e["input_ids"]))) for e in examples],
                                                 mask)  # fmt: skip
    else:
        batch["attention_mask"] = mask
    return batch


def packed_positions(positions, mask):
    """Position ids of packed rows (each example's restarting at 0), padded as `mask` (pad's) says: the right
    padding gets positions 0, 1, ...: a sequence of its own that no real token sees."""
    import torch

    padded, _ = pad([list(p) for p in positions], 0, width=mask.shape[1])
    return torch.where(mask.bool(), padded, (1 - mask).cumsum(1) - 1)


def real_tokens(examples: list[dict], batch: dict) -> int:
    """Tokens of a batch, padding excluded (packed rows carry no attention_mask to count them by)."""
    if all("input_ids" in e for e in examples):
        return sum(len(e["input_ids"]) for e in examples)
    if all("chosen_input_ids" in e for e in examples):  # preference pairs, padded or packed
        return sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()
