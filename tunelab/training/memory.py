"""Where training's memory lives: glibc's heap settings.

On Linux a training step's activations come from glibc's malloc, and whether freed blocks go back
to the OS decides how much of the heap a step leaves resident beyond what it holds. Why by hand:
PyTorch has no caching CPU allocator in its Python API, and this is a property of the process.
"""

from __future__ import annotations

import sys


def release_freed_memory(on: bool = True) -> None:
    """Make freed activation buffers go back to the OS at once, or (on=False) keep them in malloc's heap
    for reuse from the first step on.

    Linux / glibc only; a no-op elsewhere. mallopt is process-wide and the last call wins.
    - on: the mmap threshold pinned at 128 KiB (M_MMAP_THRESHOLD) returns every large block on free.
      Peak RSS stays near what a step holds (SmolLM2 LoRA SFT, batch 4 x 256: 2.05 GB against ~3 GB),
      but every later allocation takes a page fault per 4 KiB: steps ~1.6x slower (docs/performance.md).
    - off: glibc's own threshold starts at 128 KiB and only rises as mmapped blocks are freed, so the
      first step's activations are mapped, faulted in, freed and then made again in the heap: 1-3 GB
      of page faults, and at one row per pass a transient peak above every later step (1,530 against
      1,353 MB). Fixing the threshold at 32 MiB (glibc's own ceiling) and the heap's trim threshold at
      256 MiB from the start gives the later steps' behaviour from step one.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024 if on else 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024 if on else 256 * 2**20)  # M_TRIM_THRESHOLD (glibc's default: 128 KiB)
    except (OSError, AttributeError):
        pass
