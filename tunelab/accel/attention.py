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

Prefix tuning's keys and values start with the prefix every query sees (PEFT hands it in as a KV cache of
`num_virtual_tokens` positions). Given the examples' boundaries and keys longer than the queries by such a
prefix, each example attends to the prefix (not causally) and to itself (causally): two kernel calls, their
outputs merged by their log-sum-exps (`_merged`), as flash attention merges its blocks. The backward pass
calls each part's kernel backward with the merged output and log-sum-exp: each then gives exactly its keys'
share of the whole softmax's gradient, and the queries' gradients add up (tests/test_attention.py).

A sliding window (Gemma 3's local layers, Mistral) changes nothing for an example no longer than it; a longer
example is attended under the window's band as a mask (the CPU kernel's additive one, `_band`; SDPA's boolean one,
`_window_mask`, on a GPU or with attention dropout), and one longer than two windows block by block on either path,
each block of queries against the keys its windows reach (`_band_blocks`: work and masks linear in its length).

Anything else (no boundaries, a KV cache, a sliding window some example after a prefix of keys is longer than,
soft-capping, sinks, non-causal modules) goes to transformers' own SDPA function unchanged, so generation and
evaluation behave as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.accel import attention_backward
from tunelab.accel.memory import shape_bucket
from tunelab.models import loss
from tunelab.models.loading import unwrap

NAME = "tunelab_packed"
# Below this length an example's backward runs on its bf16 / fp16 inputs widened to fp32: the CPU kernel's backward
# is 1.3-2.9x slower on bf16 than on fp32 inputs up to ~300 tokens, and 1.2-1.4x faster from ~384 on (torch 2.13,
# 9 and 32 heads of 64; docs/performance.md, "bf16 weights"). A bf16 example of attention_backward.FROM tokens or
# more takes bf16 products instead (faster than either; attention_backward.py), where its pass is built.
WIDEN_BELOW = 384
# An example longer than BLOCKED_BEYOND sliding windows (and than a block) is attended BAND_BLOCK queries at a time
# against the keys their windows reach (`_band_blocks`): work linear in its length, where the band mask over the whole
# example (`_band`) is quadratic in it. Gemma 3's window of 512, 4 heads of 256, bf16, forward + backward of one
# example: 1,024 tokens 29 ms either way, 2,048 66 against 74 ms, 4,096 131 against 240, 8,192 288 against 911
# (blocks of 512: slower up to 2,048)
BLOCKED_BEYOND = 2
BAND_BLOCK = 256


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
    drop = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    # a sliding window some example (after a prefix of keys) is longer than: taken under a band mask, without a prefix
    banded = cu is not None and cu.numel() >= 2 and not _within_window(cu, window, key.shape[2] - length)
    if (
        cu is None
        or key.shape[2] < length  # longer: a prefix every query sees (prefix tuning), before the rows' own keys
        or cu.numel() < 2
        or int(cu[-1]) != rows * length
        or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
        or (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is False
        or (banded and key.shape[2] != length)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds = cu.tolist()
    pieces = [(start // length, start % length, end - start) for start, end in zip(bounds[:-1], bounds[1:])]
    if query.device.type == "cpu" and drop == 0.0:  # the CPU flash kernel
        if torch.is_autocast_enabled("cpu"):  # as autocast casts SDPA's inputs (rotary leaves q, k in fp32 there)
            query, key, value = (t.to(torch.get_autocast_dtype("cpu")) for t in (query, key, value))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = _PackedCausal.apply(query, key, value, pieces, scale, int(window) if banded else None)
    else:
        out = _per_example_sdpa(query, key, value, pieces, drop, scaling, int(window) if banded else None)
    return out.view(rows, length, heads, dim), None  # transformers' attention functions: [rows, length, ...]


def _within_window(cu: torch.Tensor, window, prefix: int = 0) -> bool:
    """Whether a sliding window (Gemma 3's local layers, Mistral, Qwen2 with use_sliding_window) changes nothing:
    transformers lets a query see the keys less than `window` positions back, so an example of at most `window`
    tokens, after a `prefix` of keys (prefix tuning), sees all of them, as plain causal attention does."""
    return window is None or int((cu[1:] - cu[:-1]).max()) + prefix <= int(window)


def _per_example_sdpa(query, key, value, pieces, dropout: float, scaling, window: int | None = None) -> torch.Tensor:
    """One SDPA call per example and a cat, `[rows * length, heads, dim]`: for GPUs and dropout. A prefix of keys
    (prefix tuning) goes before each example's own, under a causal mask aligned to the last key; an example longer
    than a sliding `window` (never with a prefix) under the window's band (`_window_mask`), one longer than two
    windows block by block (one call a block, as `_band_blocks`: each block's softmax is its queries' whole one, so
    attention dropout draws as over the whole example)."""
    rows, heads, length = query.shape[:3]
    gqa = key.shape[1] != heads
    prefix = key.shape[2] - length
    outs = []
    # unbind and split, not slicing: their backward is one stack / cat, where each slice's backward
    # would write its gradient into a zero-filled tensor the size of the whole batch
    for r, q, k, v in zip(range(rows), query.unbind(0), key.unbind(0), value.unbind(0)):
        n = [size for row, _, size in pieces if row == r]
        kp, k = k.split([prefix, length], dim=1)
        vp, v = v.split([prefix, length], dim=1)
        for qs, ks, vs in zip(q.split(n, dim=1), k.split(n, dim=1), v.split(n, dim=1)):
            if _blocked(window, qs.shape[1]):  # block by block, as the CPU kernel's path (`_band_blocks`)
                blocks = [
                    F.scaled_dot_product_attention(
                        qs[None, :, s:e],
                        ks[None, :, k0:e],
                        vs[None, :, k0:e],
                        dropout_p=dropout,
                        scale=scaling,
                        attn_mask=_block_seen(s, e, k0, window, qs.device),
                        enable_gqa=gqa,
                    )  # fmt: skip
                    for s, e, k0 in _blocks(qs.shape[1], window)
                ]
                outs.append(torch.cat(blocks, 2)[0].transpose(0, 1))
                continue
            mask = _window_mask(window, qs.shape[1], qs.device)
            if prefix:
                ks, vs = torch.cat([kp, ks], dim=1), torch.cat([vp, vs], dim=1)
                mask = torch.ones(qs.shape[1], ks.shape[1], dtype=torch.bool, device=qs.device).tril(prefix)
            out = F.scaled_dot_product_attention(
                qs[None],
                ks[None],
                vs[None],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
            outs.append(out[0].transpose(0, 1))  # [piece, heads, dim]
    # the examples tile the flattened [rows * length] positions in order
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _window_mask(window: int | None, n: int, device) -> torch.Tensor | None:
    """SDPA's boolean mask of a sliding window over an example of `n` tokens (None where it takes nothing away): a
    query sees itself and the keys less than `window` positions before it."""
    if window is None or n <= window:
        return None
    back = torch.arange(n, device=device)
    back = back[:, None] - back[None, :]
    return (back >= 0) & (back < window)


def _causal(query, key, value, scale, band=None):
    """(output, log-sum-exp) of causal attention over one example, [1, heads, length, dim]; `band` (`_band`) keeps
    each query off the keys a sliding window leaves out."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, attn_mask=band, scale=scale
    )


def _band(window: int | None, n: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask of a sliding window over an example of `n` tokens attended at `width` (None where the
    window takes nothing away): -inf where the key is `window` or more positions before the query. The kernel's
    causal flag keeps the keys after the query off (and skips their blocks); it wants the mask in the query's dtype."""
    if window is None or n <= window:
        return None
    return torch.full((width, width), float("-inf"), dtype=like.dtype, device=like.device).tril_(-window)[None, None]


def _blocked(window: int | None, n: int) -> bool:
    """Whether an example of `n` tokens under a sliding `window` is attended block by block (`BLOCKED_BEYOND`)."""
    return window is not None and n > max(BLOCKED_BEYOND * window, BAND_BLOCK)


def _blocks(length: int, window: int) -> list[tuple[int, int, int]]:
    """(first query, end, first key) of each block of BAND_BLOCK queries: every key its queries' windows reach lies
    in [first key, end)."""
    return [(s, min(length, s + BAND_BLOCK), max(0, s - window + 1)) for s in range(0, length, BAND_BLOCK)]


def _block_seen(start: int, end: int, first_key: int, window: int, device) -> torch.Tensor:
    """Which keys of a block (from `first_key` to `end`) each of its queries (`start` to `end`) sees: itself and the
    keys less than `window` positions before it."""
    back = torch.arange(start, end, device=device)[:, None] - torch.arange(first_key, end, device=device)
    return (back >= 0) & (back < window)


def _block_mask(start: int, end: int, first_key: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """`_block_seen` as the CPU kernel's additive mask, in the query's dtype: -inf where a key is not seen."""
    seen = _block_seen(start, end, first_key, window, like.device)
    mask = torch.zeros(seen.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill_(~seen, float("-inf"))[None, None]


def _band_blocks(query, key, value, scale, window: int):
    """(output, log-sum-exp) of one example [1, heads, length, dim] under causal attention within a sliding window,
    BAND_BLOCK queries at a time against the keys their windows reach: each block's softmax is its queries' whole
    one (no key they see lies outside its span), so nothing is merged."""
    outs, lses = [], []
    for s, e, k0 in _blocks(query.shape[2], window):
        o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, s:e], key[:, :, k0:e], value[:, :, k0:e], 0.0, False,
            attn_mask=_block_mask(s, e, k0, window, query), scale=scale,
        )  # fmt: skip
        outs.append(o)
        lses.append(m)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _band_blocks_backward(grad, query, key, value, out, lse, scale, window: int):
    """The gradients of `_band_blocks` for q, k, v: each block's by the kernel's backward with its output and
    log-sum-exp; the keys' and values', which several blocks reach, summed in fp32 and rounded once."""
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq = torch.empty_like(query)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (key, value))
    for s, e, k0 in _blocks(query.shape[2], window):
        gq, gk, gv = backward(
            grad[:, :, s:e], query[:, :, s:e], key[:, :, k0:e], value[:, :, k0:e], out[:, :, s:e],
            lse[:, :, s:e].contiguous(), 0.0, False, attn_mask=_block_mask(s, e, k0, window, query), scale=scale,
        )  # fmt: skip
        dq[:, :, s:e] = gq
        dk[:, :, k0:e] += gk
        dv[:, :, k0:e] += gv
    return dq, dk.to(key.dtype), dv.to(value.dtype)


def _merged(query, key, value, prefix_key, prefix_value, scale):
    """(output, log-sum-exp) of one example's queries over a prefix of keys they all see and their own keys
    (causally): each part by the kernel, merged by the log-sum-exps in fp32 (the output in the query's dtype)."""
    own, own_lse = _causal(query, key, value, scale)
    pre, pre_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, prefix_key, prefix_value, 0.0, False, scale=scale
    )
    lse = torch.logaddexp(own_lse, pre_lse)
    out = own.float().mul_((own_lse - lse).exp_()[..., None]).add_(pre.float().mul_((pre_lse - lse).exp_()[..., None]))
    return out.to(query.dtype), lse


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
    backward pass their output gradient is zero, so they add nothing to any gradient that is kept.

    Keys longer than the queries start with a prefix every example sees (prefix tuning; module doc: `_merged`).
    `window`: a sliding window some example is longer than (not with a prefix); those examples take `_band`."""

    @staticmethod
    def forward(ctx, query, key, value, pieces, scale, window):
        rows, heads, length, dim = query.shape
        prefix = key.shape[2] - length  # prefix tuning's keys before the rows' own (module doc)
        out = query.new_empty(rows * length, heads, dim)
        lse = []
        for r, p, n in pieces:
            width = shape_bucket(n, query)
            q, k, v = _span(query, r, p, width), _span(key, r, prefix + p, width), _span(value, r, prefix + p, width)
            if prefix:
                o, m = _merged(q, k, v, key[r : r + 1, :, :prefix], value[r : r + 1, :, :prefix], scale)
            elif _blocked(window, n):
                o, m = _band_blocks(q, k, v, scale, window)
            else:
                o, m = _causal(q, k, v, scale, _band(window, n, width, q))
            out[r * length + p : r * length + p + n] = o[0, :, :n].transpose(0, 1)
            lse.append(m)
        ctx.save_for_backward(query, key, value, out, *lse)
        ctx.pieces, ctx.scale, ctx.window = pieces, scale, window
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lse = ctx.saved_tensors
        length = query.shape[2]
        prefix = key.shape[2] - length
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grads = [torch.empty_like(t) if ctx.needs_input_grad[i] else None for i, t in enumerate((query, key, value))]
        half = query.dtype in (torch.bfloat16, torch.float16)
        # the prefix's gradient is summed over the examples, in fp32 (bf16 would round at every example)
        summed = [None if g is None or not prefix else g.new_zeros(g[:, :, :prefix].shape, dtype=torch.float32)
                  for g in grads[1:]]  # fmt: skip
        for (r, p, n), m in zip(ctx.pieces, lse):
            width = m.shape[-1]
            at = slice(r * length + p, r * length + p + n)
            q, k, v = _span(query, r, p, width), _span(key, r, prefix + p, width), _span(value, r, prefix + p, width)
            given = [F.pad(t[at].transpose(0, 1)[None], (0, 0, 0, width - n)) for t in (grad, out)]
            pk, pv = (key[r : r + 1, :, :prefix], value[r : r + 1, :, :prefix]) if prefix else (None, None)
            # bf16 from attention_backward.FROM tokens on: bf16 products (not after a prefix of keys)
            products = not prefix and attention_backward.takes(q, width)
            # widened exactly (fp16 always: its long-example kernel is not measured), the gradients rounded once
            if half and not products and (width < WIDEN_BELOW or query.dtype == torch.float16):
                q, k, v, pk, pv, *given = (None if t is None else t.float() for t in (q, k, v, pk, pv, *given))
            if products:
                window = ctx.window if ctx.window is not None and n > ctx.window else None
                parts = attention_backward.causal(given[0], q, k, v, given[1], m, ctx.scale, window)
            elif _blocked(ctx.window, n):
                parts = _band_blocks_backward(given[0], q, k, v, given[1], m, ctx.scale, ctx.window)
            else:  # the band made again: a [width, width] mask kept would outweigh the example
                band = _band(ctx.window, n, width, q)
                parts = backward(given[0], q, k, v, given[1], m, 0.0, True, attn_mask=band, scale=ctx.scale)
            if prefix:  # with the merged output and log-sum-exp, each part's backward is its share (module doc)
                pre = backward(given[0], q, pk, pv, given[1], m, 0.0, False, scale=ctx.scale)
                parts = (parts[0] + pre[0], *parts[1:])
                for total, part in zip(summed, pre[1:]):
                    if total is not None:
                        total[r : r + 1] += part
            for g, part, at_key in zip(grads, parts, (0, prefix, prefix)):
                if g is not None:
                    g[r : r + 1, :, at_key + p : at_key + p + n] = part[:, :, :n]
        for g, total in zip(grads[1:], summed):
            if total is not None:
                g[:, :, :prefix] = total
        return *grads, None, None, None


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
