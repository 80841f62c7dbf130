"""The backward pass of causal attention over one bf16 example as bf16 products and one compiled pass (a CPU).

The CPU flash-attention kernel's backward takes ~5x its forward on bf16 examples (SmolLM2-360M's 15 heads over 5 KV
heads at 384 tokens: 5.8 ms against 0.8; its arithmetic at ~10% of oneDNN's bf16 matmul rate on this host), ~11% of
a 360M LoRA step at 1,024 tokens (timed in the step). Written as batched products it is five oneDNN bf16 matmuls and
the softmax's elementwise work. For one head, with P the softmax the forward computed (lse its log-sum-exp, s the
scale):

    P = exp(s Q K^T - lse)  (0 above the diagonal)      dV = P^T dO
    dS = P o (dO V^T - delta),  delta_i = sum_d dO_id O_id       dQ = s dS K,   dK = s dS^T Q

(Dao 2023, FlashAttention-2, Algorithm 2, without the tiling: an example of a few hundred tokens fits in cache).
A bf16 product rounds its output to bf16, and exp(s S - lse) from a rounded S would be off by ~s |S| 2^-9, several
percent. So lse and delta are folded into the products as two more columns (a bf16 pair, hi + lo, holding each to
2^-17): S' = [Q, -lse/s] [K, 1]^T = S - lse / s is ~0 where P is large and rounds there to a small error of its own,
and dO V^T - delta is made whole before it rounds instead of cancelling after. The one pass left, P = exp(s S') with
the causal zeros, is a short C loop (compiled.py) where torch would take three passes over [heads, length, length].
Grouped-query heads are stacked over their KV head ([kv heads, group x length, dim]), so every product is one
batched matmul. An example longer than WHOLE_UP_TO is taken BLOCK queries at a time against the keys before them
(the products skip the blocks above the diagonal, and each block's [heads, BLOCK, keys] stays small); dK and dV
add up over the blocks in fp32. A sliding window (Gemma 3's local layers, Mistral) zeroes the keys it leaves out in
the same pass, and a block's products take only the keys its queries' windows reach.

Against the kernel's backward in fp32 (the reference), relative error of dq, dk, dv: 5-7e-3, against 2.4e-3 (dq) and
5-6e-3 (dk, dv) for the kernel's own bf16 backward (bf16 holds 2^-9); with lse as one bf16 column, 1.0-1.2e-2. Time
on this host (2-core AMX Xeon, torch 2.13, tbbmalloc), one example: SmolLM2-360M's 15 heads over 5 KV heads at 224
tokens 1.3 ms against 1.9 for the kernel widened to fp32 (what ran below 384 tokens), at 384 2.7-3.1 against 4.6-4.8
for the bf16 kernel, at 1,024 13.4 against 20.2; Gemma 3's 4 heads of 256 at 1,000 8.0 against 11.1. Below ~128
tokens the widened kernel is faster (FROM). In a training step it is less (docs/performance.md, "Twenty-fourth
session"): 3-5% of a LoRA step, ~5-45 MB more peak (the [heads, length, length] probabilities and their gradient of
each example in flight, where the kernel works in tiles).
"""

from __future__ import annotations

import ctypes

import torch

from tunelab.accel import compiled
from tunelab.accel.compact import scratch

FROM = 128  # shorter examples take the kernel widened to fp32 (faster there: 0.32 against 0.36 ms at 96 tokens)
WHOLE_UP_TO = 512  # longer examples are taken BLOCK queries at a time
BLOCK = 256

SOURCE = r"""  /* after compiled.BF16 */

/* e^x to ~2e-7 of itself for x <= 88 (2^f by its Taylor series to f^6, |f| <= 1/2, times 2^n), without branches so
   that the loop vectorises; e^x below e^-87 is taken as e^-87 (~1.6e-38); a NaN stays a NaN */
static inline float exp_(float x) {
    float c = x < -87.0f ? -87.0f : x;
    float t = c * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f;  /* t rounded to an integer (1.5 2^23) */
    float f = t - n;
    float p = 1.540353039e-4f;
    p = p * f + 1.333355815e-3f;
    p = p * f + 9.618129108e-3f;
    p = p * f + 5.550410866e-2f;
    p = p * f + 2.402265070e-1f;
    p = p * f + 6.931471806e-1f;
    p = p * f + 1.0f;
    uint32_t bits; memcpy(&bits, &p, 4); bits += (uint32_t)(int32_t)n << 23; memcpy(&p, &bits, 4);
    return x == x ? p : x;
}

/* rows [start, stop) of s ([rows, keys] bf16: scores less the row's log-sum-exp over the scale; key j at position
   key0 + j), in place: the probabilities e^(scale s) for the keys the row's query (at first + row % block) sees, 0
   for the others: those after it, and with a sliding window (> 0) those `window` or more positions before it */
void probs(int64_t start, int64_t stop, uint16_t *s, int64_t keys, int64_t block, int64_t first, int64_t key0,
           int64_t window, float scale) {
    for (int64_t r = start; r < stop; r++) {
        uint16_t *row = s + r * keys;
        int64_t query = first + r % block;
        int64_t end = query + 1 - key0, begin = window > 0 ? query - window + 1 - key0 : 0;
        if (end > keys) end = keys;
        if (begin < 0) begin = 0;
        memset(row, 0, (size_t)begin * 2);
        for (int64_t j = begin; j < end; j++) row[j] = to_bf16(exp_(from_bf16(row[j]) * scale));
        memset(row + end, 0, (size_t)(keys - end) * 2);
    }
}
"""
SIGNATURE = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_float]


def load():
    """The compiled pass (a ctypes function), or None: `why_not()` then says why."""
    lib = compiled.load("attention_backward", compiled.BF16 + SOURCE, {"probs": SIGNATURE})
    return None if lib is None else lib.probs


def why_not() -> str:
    return compiled.why_not("attention_backward")


def takes(query: torch.Tensor, width: int) -> bool:
    """Whether an example of `width` (its bucketed length) with these queries goes here: bf16 on a CPU, long enough,
    and the pass built."""
    return query.dtype == torch.bfloat16 and query.device.type == "cpu" and width >= FROM and load() is not None


def _with_columns(t: torch.Tensor, fill: float, *columns: torch.Tensor) -> torch.Tensor:
    """[..., dim] widened by two columns: `fill`, or the two given ([...] each) where given."""
    wide = torch.nn.functional.pad(t, (0, 2), value=fill)
    for i, c in enumerate(columns):
        wide[..., t.shape[-1] + i] = c
    return wide


def _hi_lo(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bf16 tensors whose sum is fp32 `x` to ~2^-17 of it."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _rows(t: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """Queries first .. end of [kv heads, group, length, dim] as [kv heads, group x (end - first), dim]: each KV
    head's query heads stacked (a copy where they are not contiguous)."""
    return t[:, :, first:end].reshape(t.shape[0], -1, t.shape[-1])


def _scratch(shape, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [shape] bf16 tensors in this thread's scratch buffer (compact.scratch): one allocation for every example
    and block, where a new pair each left a cached block per example width in the allocator until the step's end
    (peak 2,052-2,055 against 2,060-2,063 MB at 360M x 1,024)."""
    pair = scratch((2, *shape), like.device, torch.bfloat16)
    return pair[0], pair[1]


def causal(grad, query, key, value, out, lse, scale: float, window: int | None = None):
    """(dq, dk, dv) of causal attention over one example: query, grad, out [1, heads, length, dim], key, value
    [1, kv heads, length, dim] in bf16, lse [1, heads, length] fp32 (the kernel's forward's); `window`: a sliding
    window (each query sees itself and the keys less than `window` positions before it). Module doc."""
    fn = load()
    _, heads, length, dim = query.shape
    kv = key.shape[1]
    group = heads // kv
    delta = torch.linalg.vecdot(grad.float(), out.float())[0]  # [heads, length]
    q_lse = _with_columns(query[0], 0.0, *_hi_lo(lse[0] / -scale)).view(kv, group, length, dim + 2)
    do_delta = _with_columns(grad[0], 0.0, *_hi_lo(-delta)).view(kv, group, length, dim + 2)
    k_ones, v_ones = _with_columns(key[0], 1.0), _with_columns(value[0], 1.0)
    q, do, k = query[0].reshape(kv, group, length, dim), grad[0].reshape(kv, group, length, dim), key[0]
    # the products' batch is the KV heads: with one (Gemma 3 270M) a block of twice as many queries keeps them big
    # enough (4,096 tokens under a window of 512, 4 heads of 256: 53-57 against 62-64 ms)
    block = length if length <= WHOLE_UP_TO else BLOCK * (2 if kv == 1 else 1)
    parts = []
    for first in range(0, length, block):
        end = min(length, first + block)
        n = end - first
        keys = slice(0 if window is None else max(0, first - window + 1), end)  # every key this block's queries see
        p, ds = _scratch((kv, group * n, end - keys.start), query)
        torch.bmm(_rows(q_lse, first, end), k_ones[:, keys].transpose(1, 2), out=p)  # S - lse / scale
        # P (one thread: as fast, beside torch's)
        fn(0, kv * group * n, p.data_ptr(), end - keys.start, n, first, keys.start, window or 0, scale)
        torch.bmm(_rows(do_delta, first, end), v_ones[:, keys].transpose(1, 2), out=ds).mul_(p)  # (dO V^T - delta) P
        parts.append((keys, torch.bmm(ds, k[:, keys]), torch.bmm(ds.transpose(1, 2), _rows(q, first, end)),
                      torch.bmm(p.transpose(1, 2), _rows(do, first, end))))  # fmt: skip
    if len(parts) == 1:
        _, dq, dk, dv = parts[0]
        dk = dk.mul_(scale)
    else:  # the keys' gradients summed over the blocks in fp32
        dq = torch.cat([d.view(kv, group, -1, dim) for _, d, _, _ in parts], 2)
        dk, dv = (torch.zeros(kv, length, dim, dtype=torch.float32, device=query.device) for _ in range(2))
        for keys, _, k_part, v_part in parts:
            dk[:, keys] += k_part
            dv[:, keys] += v_part
        dk, dv = dk.mul_(scale).to(key.dtype), dv.to(value.dtype)
    return dq.view(1, heads, length, dim).mul_(scale), dk[None], dv[None]
