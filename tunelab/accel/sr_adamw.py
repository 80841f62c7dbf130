"""The step of AdamW over bf16 weights with stochastic rounding (training/bf16_adamw.py) as one compiled loop.

In PyTorch ops the step takes ~11 passes per chunk (widen p, g, m, v; the fused AdamW kernel; add the noise; clear
the low bits; narrow p, m, v) and a dispatch each: 366 ms for SmolLM2-135M's 134.5M weights on 2 cores, a sixth
of a full fine-tuning step. Here each weight is read once and written once (8 bytes in, 6 out) with its noise
hashed from its index where it is used: 114 ms, about what memory allows (docs/performance.md, "bf16 weights").
No maintained library has it for a CPU: torchao's stochastic-rounding AdamW needs torch.compile, whose inductor code
for this step measured no faster than the PyTorch ops (its random numbers are Philox, per element).

The C below is compiled at first use (accel/compiled.py: the system's C compiler, cached per CPU); each tensor's
halves run in two threads. No compiler, or a failed build: `stepper` returns None, `why_not()` says why and the
PyTorch-ops step runs, the same update.
"""

from __future__ import annotations

import ctypes

import torch

from tunelab.accel import compiled

# The update is torch._fused_adamw_'s (decoupled weight decay, bias corrections as step_size and sqrt(bc2)), in
# fp32 (the gradient times `scale`: gradient clipping's factor, BF16AdamW.clip_grad_norm_), its coefficients
# (1 - beta, 1 - lr * wd, ...) worked out in double as torch's are (1 - 0.999f is 1.3e-5 off); then each of p, m,
# v rounded to bf16 stochastically: 16 random bits added below bf16's mantissa and those bits dropped. The noise of element i is a hash of (key, i) (murmur3's finaliser): the same for any split of the
# tensor among threads, and a resumed run draws what the uninterrupted one would.
SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}
static inline float widen(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t rounded(float f, uint32_t noise) {
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + (noise & 0xffffu)) >> 16);
}

void sr_adamw_bf16(int64_t start, int64_t stop, uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v,
                   float b1, float c1, float b2, float c2, float decay, float step_size, float bc2_sqrt, float eps,
                   float scale, uint32_t key) {
    const uint32_t k1 = mix32(key), k2 = mix32(key ^ 0x68e31da4u);
    for (int64_t i = start; i < stop; i++) {
        float gf = widen(g[i]) * scale;
        float pf = widen(p[i]) * decay;
        float mf = b1 * widen(m[i]) + c1 * gf;
        float vf = b2 * widen(v[i]) + c2 * gf * gf;
        pf = pf - step_size * (mf / (sqrtf(vf) / bc2_sqrt + eps));
        uint32_t at = (uint32_t)i * 0x9e3779b1u;
        uint32_t h1 = mix32(at ^ k1), h2 = mix32(at ^ k2);
        p[i] = rounded(pf, h1);
        m[i] = rounded(mf, h1 >> 16);
        v[i] = rounded(vf, h2);
    }
}

/* The same update of an fp32 weight (kept exactly in fp32) from a bf16 gradient and bf16 moments, the moments
   rounded stochastically: training.optimizer_state bf16 (training/bf16_adamw.py). */
void sr_adamw_fp32w(int64_t start, int64_t stop, float *p, const uint16_t *g, uint16_t *m, uint16_t *v,
                    float b1, float c1, float b2, float c2, float decay, float step_size, float bc2_sqrt, float eps,
                    float scale, uint32_t key) {
    const uint32_t k1 = mix32(key), k2 = mix32(key ^ 0x68e31da4u);
    for (int64_t i = start; i < stop; i++) {
        float gf = widen(g[i]) * scale;
        float mf = b1 * widen(m[i]) + c1 * gf;
        float vf = b2 * widen(v[i]) + c2 * gf * gf;
        p[i] = p[i] * decay - step_size * (mf / (sqrtf(vf) / bc2_sqrt + eps));
        uint32_t at = (uint32_t)i * 0x9e3779b1u;
        m[i] = rounded(mf, mix32(at ^ k1));
        v[i] = rounded(vf, mix32(at ^ k2));
    }
}
"""
SIGNATURE = [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_float] * 9 + [ctypes.c_uint32]
FUNCTIONS = {"sr_adamw_bf16": SIGNATURE, "sr_adamw_fp32w": SIGNATURE}


def load():
    """The compiled steps (ctypes functions by name: `FUNCTIONS`), or None; `why_not()` then says why."""
    return compiled.load("sr_adamw", SOURCE, FUNCTIONS)


def why_not() -> str:
    return compiled.why_not("sr_adamw")


class Stepper:
    """Runs the compiled step over CPU tensors, each long one split among `threads` threads."""

    def __init__(self, lib, threads: int):
        self.lib, self.threads = lib, max(1, threads)
        self.pending: list = []

    def submit(self, p, g, m, v, *, lr, b1, b2, eps, wd, step: int, key: int, scale: float = 1.0) -> None:
        """Queue the step of `p` (bf16, or fp32 updated exactly) from bf16 gradient `g` times `scale` and bf16
        moments `m`, `v` (contiguous, on the CPU); `wait` ends it."""
        fn = self.lib.sr_adamw_bf16 if p.dtype == torch.bfloat16 else self.lib.sr_adamw_fp32w
        bias = (lr / (1 - b1**step), (1 - b2**step) ** 0.5)
        args = (b1, 1 - b1, b2, 1 - b2, 1 - lr * wd, *bias, eps, scale, key & 0xFFFFFFFF)
        ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
        futures = compiled.split(fn, p.numel(), *ptrs, *args, threads=self.threads)
        self.pending += [(f, g) for f in futures]

    def wait(self) -> None:
        for future, _ in self.pending:  # the gradient kept alive (it may be a temporary bf16 copy) until done
            future.result()
        self.pending.clear()


def stepper():
    """A Stepper for CPU tensors, or None (no compiled step: `why_not()`)."""
    lib = load()
    return Stepper(lib, torch.get_num_threads()) if lib is not None else None
