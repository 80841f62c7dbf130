"""LoRA dropout's keep masks drawn by one compiled loop: a counter-based hash of (key, element), not torch's generator.

Fast LoRA (fast_lora.py) draws a Bernoulli keep mask per layer and call and draws it again in the backward pass
rather than keeping it. From torch's CPU generator (mt19937, one thread) that draw was 13.5% of a LoRA step of the
default model at 1,024 tokens (profile, 420 draws of 0.72 ms) and its comparison 4% more. Here element i of a draw
keeps where its 16 bits of murmur3's finaliser over (key, i / 4) (two 32-bit hashes a word of four elements, as
sr_adamw.py draws its rounding noise) are at least p 65536 rounded (the same p to 1/65536 as before): one pass
writing the mask, split among the threads, the same bits for any split; 0.21 ms for a [1,024, 1,536] mask on one
core against 2.4 ms. The key (64 bits) is
drawn from the thread's torch generator (so the run's seed, thread shares' own generators and a resume's restored
RNG decide the masks, as before), and it is all the backward pass needs to draw the mask again. Compiled at first
use (compiled.py); without a C compiler `load` returns None and fast_lora draws from torch's generator as before.
"""

from __future__ import annotations

import ctypes

import torch

from tunelab.accel import compiled

SOURCE = r"""
#include <stdint.h>

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}

/* words [start, stop) of a mask: word w holds elements 4w ... 4w + 3, each 1 where its 16 bits of two hashes of
   (key, w) are at least the threshold (the buffer is whole words: `draw` rounds it up) */
void keep_mask(int64_t start, int64_t stop, uint32_t *out, uint64_t key, uint32_t t) {
    const uint32_t k1 = mix32((uint32_t)key), k2 = mix32((uint32_t)(key >> 32) ^ 0x68e31da4u);
    for (int64_t w = start; w < stop; w++) {
        uint32_t at = (uint32_t)w * 0x9e3779b1u, a = mix32(at ^ k1), b = mix32(at ^ k2);
        out[w] = (uint32_t)((a & 0xffffu) >= t) | (uint32_t)((a >> 16) >= t) << 8
               | (uint32_t)((b & 0xffffu) >= t) << 16 | (uint32_t)((b >> 16) >= t) << 24;
    }
}
"""
SIGNATURE = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32]


def load():
    """The compiled draw (a ctypes function), or None; `why_not()` then says why."""
    lib = compiled.load("lora_masks", SOURCE, {"keep_mask": SIGNATURE})
    return None if lib is None else lib.keep_mask


def why_not() -> str:
    return compiled.why_not("lora_masks")


def new_key(generator: torch.Generator) -> int:
    """A 64-bit key from `generator` (one draw)."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator)) & (2**64 - 1)


def draw(fn, shape, p: float, key: int) -> torch.Tensor:
    """The bool keep mask of `shape` for `key`: each element kept with probability 1 - p (p to 1/65536)."""
    n = torch.Size(shape).numel()
    words = (n + 3) // 4
    out = torch.empty(4 * words, dtype=torch.bool)  # whole words: the last one's spare bytes are dropped below
    compiled.run(fn, words, out.data_ptr(), key, round(p * 65536), threads=torch.get_num_threads())
    return out[:n].view(shape)
