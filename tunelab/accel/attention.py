"""Attention over packed rows: one causal attention call per example instead of one masked call per row.

A packed row holds several examples whose position ids restart at 0. With SDPA, transformers turns
those ids into a block-diagonal causal mask and, because a mask is given, repeats the key/value
heads of grouped-query models (SmolLM2: 3 -> 9) and asks the kernel for the whole row: it computes
every masked score and keeps the repeated keys and values for the backward pass. Here the batch
carries the examples' boundaries in the standard varlen kwargs (`cu_seq_lens_q/k`, the ones
flash-attention's varlen path reads, over the flattened `[rows * length]` positions), and each
example gets its own `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`: the kernel
skips the blocks above the diagonal, nothing is repeated, and no other example can be seen. Same
result as the masked call to rounding (tests/test_attention.py); on SmolLM2 LoRA SFT one layer's
attention forward + backward over 4 packed rows of 256 takes ~25-32 ms instead of ~32-42 ms.

Without it (`training.accelerate: off`) packed rows are still attended per example: transformers builds
the block-diagonal causal mask from the position ids (data/collate.py), the plain path.

Anything else (no boundaries, a KV cache, sliding windows, soft-capping, sinks, non-causal modules)
goes to transformers' own SDPA function unchanged, so generation and evaluation behave as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.accel.memory import shape_bucket
from tunelab.models import loss
from tunelab.models.loading import unwrap

NAME = "tunelab_packed"


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """The boundaries of the examples of packed rows whose position ids restart at 0 at each example
    (padding counts as one more example): cumulative lengths over the flattened positions."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    rows, heads, length, dim = query.shape
    if (
        cu is None
        or key.shape[2] != length
        or cu.numel() < 2
        or int(cu[-1]) != rows * length
        or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))
        or (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is False
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds = cu.tolist()
    pieces = [(start // length, start % length, end - start) for start, end in zip(bounds[:-1], bounds[1:])]
    drop = dropout if module.training else 0.0
    if query.device.type == "cpu" and drop == 0.0:
        if torch.is_autocast_enabled("cpu"):  # as autocast casts SDPA's inputs (rotary leaves q, k in fp32 there)
            query, key, value = (t.to(torch.get_autocast_dtype("cpu")) for t in (query, key, value))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = _PackedCausal.apply(query, key, value, pieces, scale)
    else:
        out = _per_example_sdpa(query, key, value, pieces, drop, scaling)
    return out.view(rows, length, heads, dim), None  # transformers' attention functions: [rows, length, ...]


def _per_example_sdpa(query, key, value, pieces, dropout: float, scaling) -> torch.Tensor:
    """One SDPA call per example and a cat, `[rows * length, heads, dim]`: for GPUs and dropout."""
    rows, heads = query.shape[:2]
    gqa = key.shape[1] != heads
    outs = []
    # unbind and split, not slicing: their backward is one stack / cat, where each slice's backward
    # would write its gradient into a zero-filled tensor the size of the whole batch
    for r, q, k, v in zip(range(rows), query.unbind(0), key.unbind(0), value.unbind(0)):
        n = [size for row, _, size in pieces if row == r]
        for qs, ks, vs in zip(q.split(n, dim=1), k.split(n, dim=1), v.split(n, dim=1)):
            out = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
            )
            outs.append(out[0].transpose(0, 1))  # [piece, heads, dim]
    # the examples tile the flattened [rows * length] positions in order
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _causal(query, key, value, scale):
    """(output, log-sum-exp) of causal attention over one example, [1, heads, length, dim]."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)


class _PackedCausal(torch.autograd.Function):
    """Causal attention within each example (row, start, length) of packed rows, by the CPU flash-attention
    kernel SDPA itself dispatches to, every example's output written straight into one `[rows * length,
    heads, dim]` tensor, the input of the output projection.

    Why not one SDPA call per example and a cat: autograd then keeps each example's output for SDPA's
    backward pass and the concatenated copy for the projection's, the same numbers twice (SmolLM2: 34 MB per
    512 tokens). Here the one tensor serves both; the gradients are the kernel's own (same bits).

    In bf16 each example is attended at its length rounded up (`memory.shape_bucket`: a kernel per length
    otherwise stays in memory): the positions after it are the next example's, or zeros past the row's end.
    Causal attention keeps an example's queries off those keys; their own outputs are dropped, and in the
    backward pass their output gradient is zero, so they add nothing to any gradient that is kept."""

    @staticmethod
    def forward(ctx, query, key, value, pieces, scale):
        rows, heads, length, dim = query.shape
        out = query.new_empty(rows * length, heads, dim)
        lse = []
        for r, p, n in pieces:
            width = shape_bucket(n, query)
            o, m = _causal(*(_span(t, r, p, width) for t in (query, key, value)), scale)
            out[r * length + p : r * length + p + n] = o[0, :, :n].transpose(0, 1)
            lse.append(m)
        ctx.save_for_backward(query, key, value, out, *lse)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lse = ctx.saved_tensors
        length = query.shape[2]
        grads = [torch.empty_like(t) if ctx.needs_input_grad[i] else None for i, t in enumerate((query, key, value))]
        for (r, p, n), m in zip(ctx.pieces, lse):
            width = m.shape[-1]
            at = slice(r * length + p, r * length + p + n)
            inputs = [_span(t, r, p, width) for t in (query, key, value)]
            given = [F.pad(t[at].transpose(0, 1)[None], (0, 0, 0, width - n)) for t in (grad, out)]
            parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                given[0], *inputs, given[1], m, 0.0, True, scale=ctx.scale
            )
            for g, part in zip(grads, parts):
                if g is not None:
                    g[r : r + 1, :, p : p + n] = part[:, :, :n]
        return *grads, None, None


def _span(t: torch.Tensor, row: int, start: int, width: int) -> torch.Tensor:
    """Positions start .. start + width of one row, [1, heads, width, dim]; zeros where they pass its end."""
    piece = t[row : row + 1, :, start : start + width]
    short = width - piece.shape[2]
    return F.pad(piece, (0, 0, 0, short)) if short else piece


def active(model) -> bool:
    inner = unwrap(model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == NAME


def install(model) -> bool:
    """Route `model`'s attention through `packed_attention` when it uses SDPA; True if it does now."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    setattr(inner, loss.PACKED_INPUTS, varlen_kwargs)  # the loss hands the examples' bounds to the forward
    setattr(inner, loss.PACKED_WIDTH, shape_bucket)  # and pads rows it lays end to end to this width
    return True
