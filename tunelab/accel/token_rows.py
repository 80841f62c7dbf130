"""The rows of new tokens (`model.new_special_tokens` with lora / qlora) on the fast path.

PEFT trains them in a trainable-token layer beside the token table (and the head): each forward pass writes the
trained rows into a copy of the whole table (`index_copy`) and looks the tokens up in that copy, or multiplies the
hidden states by it for the head. So every pass copies the table, and the backward pass makes a table-sized
gradient (the lookup's dense one, the head's whole dW) to keep only the new rows of it. On SmolLM2-135M's shape
(LoRA, bf16 passes, 4 rows of 256) that made a step 24-30% slower and its peak 45% higher than here (1,312 ->
1,813 MB), on Gemma 3 270M's (a 262k-row table) twice as slow at 2.5x the peak (docs/performance.md, "Twenty-third
session").

Here the table is read as it is, and only the new rows' part is added:
- the lookup (`install`): every id looked up in the frozen table, then the trained row put in where the id is a new
  token's (a gather from the [new, hidden] rows), so the gradient reaches those rows only;
- the head (`head_rows`, taken by the fused head, head.py): the frozen table's logits, the new rows' replaced by
  theirs, and their gradient [new, hidden] summed beside dh.
The same values as PEFT's layer (tests/test_new_tokens.py). A layer in another state (adapters off or merged,
several adapters, a norm-clipped embedding, a head with a bias) runs PEFT's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.accel.compact import CompactEmbedding, CompactLinear
from tunelab.accel.fast_lora import route


def _layer(module):
    """The PEFT trainable-token layer of `module` (the wrapper PEFT puts in the table's place, or the layer), or None."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layer = getattr(module, "token_adapter", module)
    return layer if isinstance(layer, TrainableTokensLayer) else None


def _a_table(base) -> bool:
    """A token table the lookup takes: an nn.Embedding (Gemma's scaled one too: a one-number `embed_scale`, which
    its forward multiplies every row by), without a max_norm (that renormalises the rows it reads)."""
    if type(base) is CompactEmbedding:  # the frozen table kept compact (fp32 runs: accel/compact.py)
        return True
    scale = getattr(base, "embed_scale", None)
    one = scale is None or isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
    return isinstance(base, nn.Embedding) and base.max_norm is None and one


def _a_head(base) -> bool:
    """A head the fused head takes: a bias-free linear map, dense or compact."""
    return type(base) in (nn.Linear, CompactLinear) and base.bias is None


def _rows(layer, takes) -> tuple[torch.Tensor, nn.Parameter] | None:
    """(the new tokens' ids, their trained rows) of a trainable-token layer whose base `takes` accepts, where its one
    adapter runs unmerged; None otherwise."""
    if layer is None or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if not takes(layer.base_layer):
        return None
    if name not in layer.trainable_tokens_delta:
        return None
    delta = layer.trainable_tokens_delta[name]
    index = getattr(layer, "_tunelab_index", None)
    if index is None or index.device != delta.device:
        index = torch.tensor(layer.token_indices[name], device=delta.device)
        layer._tunelab_index = index
    return index, delta


def head_rows(head):
    """(the head's frozen linear map, (ids, trained rows)) where `head` is PEFT's trainable-token layer (or its
    wrapper) over a bias-free linear head that the fused head can take; None otherwise."""
    layer = _layer(head)
    rows = _rows(layer, _a_head)
    return None if rows is None else (layer.base_layer, rows)


def trains_rows(module) -> bool:
    """Whether `module` is (or wraps) a PEFT trainable-token layer."""
    return _layer(module) is not None


def trained(model) -> list[nn.Parameter]:
    """The rows every trainable-token layer of `model` trains. PEFT casts them to the table's dtype as it writes them
    into its copy (and `_lookup`, the fused head likewise), so a bf16 table's pass stays bf16 and the fp32 rows get
    fp32 gradients through the cast."""
    found = {id(p): p for m in model.modules() if (layer := _layer(m)) is m
             for p in layer.trainable_tokens_delta.parameters() if p.requires_grad}  # fmt: skip
    return list(found.values())


def install(model) -> int:
    """Route every trainable-token layer over a plain token table through `_lookup`; how many."""
    n = 0
    for module in model.modules():
        layer = _layer(module)
        if layer is module and _a_table(layer.base_layer):  # the layer itself, not PEFT's wrapper
            n += route(layer, "_peft_token_forward", _lookup)
    return n


def _lookup(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    rows = None if args or kwargs else _rows(self, _a_table)
    if rows is None:
        return self._peft_token_forward(x, *args, **kwargs)
    index, delta = rows
    out = self.base_layer(x)  # a scaled table (Gemma's) scales its rows: the new ones are scaled the same way below
    new = delta.to(out.dtype)
    if (scale := getattr(self.base_layer, "embed_scale", None)) is not None:
        new = new * torch.as_tensor(scale).to(out.dtype)
    slots = getattr(self, "_tunelab_slots", None)
    if slots is None or slots.device != x.device:
        slots = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.long, device=x.device)
        slots[index.to(x.device)] = torch.arange(len(index), device=x.device)
        self._tunelab_slots = slots
    slot = slots[x]
    return torch.where((slot >= 0)[..., None], new[slot.clamp(min=0)], out)
