"""Where training's memory lives: the allocator behind CPU tensors and glibc's heap settings.

On Linux a training step's activations come from malloc. glibc's malloc keeps one heap that small
allocations split, so a step leaves far more resident than it holds (docs/performance.md); a
size-class allocator does not. Intel's TBB scalable allocator (`tbbmalloc`, the `tbb` wheel on PyPI)
is one; it replaces malloc only when preloaded at process start (LD_PRELOAD), which is why
`tunelab train` restarts itself once with it (`training.allocator`; never with `training.accelerate:
off`), the way PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) preloads jemalloc or
tcmalloc. Why by hand: PyTorch has no caching CPU allocator in its Python API, and this is a property
of the process.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

TBB_LIBS = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the allocator, then its malloc replacement
_MARK = "TUNELAB_ALLOCATOR"  # set in the restarted process: never restart twice


def tbbmalloc_libraries() -> list[Path] | None:
    """The tbb wheel's allocator libraries (in the environment's lib/), or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    for lib in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        paths = [lib / name for name in TBB_LIBS]
        if all(p.is_file() for p in paths):
            return paths
    return None


def active_allocator() -> str:
    """'tbbmalloc' when this process's malloc is TBB's (preloaded), else 'system'."""
    if not sys.platform.startswith("linux"):
        return "system"
    try:
        ctypes.CDLL(TBB_LIBS[1], mode=os.RTLD_NOLOAD)
        return "tbbmalloc"
    except OSError:
        return "system"


# how far the resident set may grow past where the last hand-back left it before the next one (cache_cleaner)
CACHE_SLACK = 64 * 2**20


def cache_cleaner(slack: int = CACHE_SLACK):
    """A call that hands tbbmalloc's cached free blocks back (`scalable_allocation_command(TBBMALLOC_CLEAN_ALL_BUFFERS)`)
    once the resident set has grown `slack` bytes past where the last hand-back left it; None where this process's
    malloc is not tbbmalloc. Called after each optimizer step: in a bf16 LoRA run its caches otherwise grew the peak
    by ~200 MB (1,577 against 1,386 MB over the bench's epoch). Each hand-back costs the next step the page faults
    of taking the blocks again (a step ~5% slower when done every step), hence the slack: the first call and
    those past the slack clean (returning the command's status), the others return None."""
    command = tbbmalloc_hand_back()
    if command is None:
        return None
    floor = [-1]  # the resident bytes after the last hand-back (-1: none yet)

    def clean():
        if floor[0] >= 0 and resident_bytes() <= floor[0] + slack:
            return None
        status = command()
        floor[0] = resident_bytes()
        return status

    return clean


def tbbmalloc_hand_back():
    """A call that hands all of tbbmalloc's cached free blocks back to the OS now (returning its status), or None
    where this process's malloc is not tbbmalloc."""
    if active_allocator() != "tbbmalloc":
        return None
    command = ctypes.CDLL(TBB_LIBS[0], mode=os.RTLD_NOLOAD).scalable_allocation_command
    command.argtypes, command.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
    return lambda: command(0, None)  # 0: TBBMALLOC_CLEAN_ALL_BUFFERS


def hand_back_in_backward(model, clean, points: int = 4) -> int:
    """Call `clean` (tbbmalloc_hand_back's call) `points` - 1 times in each backward pass, as it reaches evenly spaced
    transformer blocks (of the model's longest block list); returns how many blocks call it.

    Where most weights train, the backward pass allocates their gradients (270 MB in bf16 for SmolLM2-135M) while
    it frees the activations (~410 MB a pass); tbbmalloc keeps the freed blocks for sizes the gradients do not
    have, so the two were resident together at the pass's end: the run's peak. Handed back on the way, the
    gradients take the activations' pages: the bench's full fine-tuning peak 2,044 -> 1,835 MB
    (docs/performance.md, "bf16 weights"). Hooks on a layer's input fire when its gradient is made."""
    import torch  # here: `tunelab train` imports this module to restart itself before torch loads

    from tunelab.models.blocks import block_lists

    stacks = [blocks for _, blocks in block_lists(model)]
    layers = list(max(stacks, key=len)) if stacks else []
    if len(layers) < points:
        return 0
    chosen = [layers[round(k * len(layers) / points)] for k in range(1, points)]

    def on_gradient(grad):
        clean()

    def on_forward(module, args, output):
        x = args[0] if args else None
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(on_gradient)

    for layer in chosen:
        layer.register_forward_hook(on_forward)
    return len(chosen)


def resident_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def releases_memory(tcfg) -> bool:
    """`training.release_memory`; by default on with `gradient_checkpointing: true` (the low-memory setting) where
    the process runs on glibc's malloc. On tbbmalloc there is no threshold to pin: it keeps peak RSS near what a
    step holds by itself, and glibc's pinned mode was ~5-8% lower still but ~30% slower (docs/performance.md)."""
    if tcfg.release_memory is not None:
        return tcfg.release_memory
    # known before the model loads: an explicit `gradient_checkpointing: true`, not the choice `auto` makes later
    return tcfg.gradient_checkpointing is True and active_allocator() == "system"


def wants_tbbmalloc(tcfg) -> bool:
    """Whether a run with these training settings should run on tbbmalloc (`training.allocator`)."""
    if tcfg.accelerate == "off" or tcfg.allocator == "system":  # off: the process's own malloc, as plain PyTorch
        return False
    if tcfg.allocator == "auto" and tcfg.release_memory is True:
        return False  # returning memory at once is glibc's pinned-threshold mode (release_freed_memory)
    return True


def allocator_note(tcfg, on_cpu: bool) -> str | None:
    """The run log's line about the allocator: the one in use, or how to get tbbmalloc from Python."""
    if active_allocator() == "tbbmalloc":
        return "allocator: tbbmalloc (training.allocator)"
    libs = tbbmalloc_libraries()
    if on_cpu and libs and wants_tbbmalloc(tcfg):
        return (
            "allocator: glibc malloc. `tunelab train` runs on tbbmalloc (lower peak memory, as fast or faster); "
            f"from Python: LD_PRELOAD='{' '.join(map(str, libs))}' python ... (docs/performance.md)"
        )
    return None


def allocator_environment(env: dict | None = None) -> dict | None:
    """A copy of `env` (default os.environ) that preloads tbbmalloc, or None where that cannot or need not be
    done: not Linux, no tbb wheel, LD_PRELOAD already set by the user, or already restarted."""
    env = dict(os.environ if env is None else env)
    libs = tbbmalloc_libraries()
    if libs is None or env.get("LD_PRELOAD") or env.get(_MARK):
        return None
    env["LD_PRELOAD"] = " ".join(str(p) for p in libs)  # both by path: no LD_LIBRARY_PATH needed
    env[_MARK] = "tbbmalloc"
    return env


def restart_with_tbbmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m tunelab ARGV` with tbbmalloc preloaded; returns only when that
    cannot or need not be done (see allocator_environment)."""
    env = allocator_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "tunelab", *argv], env)
    except OSError as e:  # e.g. a read-only or vanished interpreter: train on as we are
        print(f"[tunelab] could not restart on tbbmalloc ({e}); training on the system allocator", file=sys.stderr)


def release_freed_memory(on: bool = True) -> None:
    """Make freed activation buffers go back to the OS at once, or (on=False) keep them in malloc's heap
    for reuse from the first step on.

    Linux / glibc only; a no-op elsewhere and under tbbmalloc. mallopt is process-wide and the last
    call wins.
    - on: the mmap threshold pinned at 128 KiB (M_MMAP_THRESHOLD) returns every large block on free.
      Peak RSS stays near what a step holds (SmolLM2 LoRA SFT, batch 4 x 256: 2.05 GB against ~3 GB),
      but every later allocation takes a page fault per 4 KiB: steps ~1.6x slower (docs/performance.md).
    - off: glibc's own threshold starts at 128 KiB and only rises as mmapped blocks are freed, so the
      first step's activations are mapped, faulted in, freed and then made again in the heap: 1-3 GB
      of page faults, and at one row per pass a transient peak above every later step (1,530 against
      1,353 MB). Fixing the threshold at 32 MiB (glibc's own ceiling) and the heap's trim threshold at
      256 MiB from the start gives the later steps' behaviour from step one.
    """
    if not sys.platform.startswith("linux") or active_allocator() != "system":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024 if on else 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024 if on else 256 * 2**20)  # M_TRIM_THRESHOLD (glibc's default: 128 KiB)
    except (OSError, AttributeError):
        pass


def skip_unused_imports(cfg) -> bool:
    """For a process that runs this one training (`tunelab train`, the bench's jobs): keep bitsandbytes out
    when the method has no use for it. peft imports it whenever it is installed, for its quantised LoRA
    layers: ~50 MB resident (its CPU kernels and the libraries they load) in a run that never quantises.
    Only a method with a quantized base (qlora) uses it. Afterwards `import bitsandbytes` raises ImportError
    in this process, so this is for a process of its own, before anything imports peft. True when it was done
    (never with `training.accelerate: off`: a plain process). Also imports transformers' model code without
    scipy.optimize (`transformers_without_scipy`)."""
    from tunelab.methods.registry import capabilities

    if cfg.training.accelerate == "off":
        return False
    done = not capabilities(cfg.method.name).quantized_base and keep_out_bitsandbytes()
    transformers_without_scipy()
    return done


def transformers_without_scipy() -> bool:
    """Import transformers' model code (`transformers.modeling_utils`) with scipy reported missing. Its
    object-detection losses (DETR's Hungarian matching) import scipy.optimize at import time wherever scipy is
    installed (scikit-learn, which tunelab's metrics use, installs it): measured 35 MB resident (430 against 395 MB
    after `import transformers.modeling_utils, peft`) in every process that trains a language model, which never
    uses them. scipy itself stays importable (scikit-learn imports it as usual later); only those losses go
    without it. For a process of its own, before transformers' model code is imported; True when done."""
    if "transformers.modeling_utils" in sys.modules:
        return False
    import transformers.utils as utils

    real = utils.is_scipy_available
    utils.is_scipy_available = lambda: False
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        utils.is_scipy_available = real
    return True


def keep_out_bitsandbytes() -> bool:
    """Make `import bitsandbytes` fail in this process (peft then leaves its quantised layers out), unless it
    or peft is imported already; True when done. Also spares commands that load a run without a 4-bit base
    (`tunelab generate`, ...) bitsandbytes' import-time warnings. For a process of its own only."""
    if "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # importlib's "known to be missing": find_spec gives None
    return True


# Lengths a reduced-precision CPU kernel sees are rounded up to a multiple of this (`shape_bucket`).
SHAPE_BUCKET = 32


def shape_bucket(n: int, t) -> int:
    """`n` rounded up to a multiple of SHAPE_BUCKET where `t` (a tensor) is bf16 / fp16 on a CPU, else `n`.

    Why: on a CPU, torch runs bf16 matmuls through oneDNN and bf16 flash attention through oneDNN's brgemm
    kernels, which compile and keep a kernel, with buffers, for every new shape and never free them (oneDNN's
    primitive cache holds up to 1,024; fp32 goes to MKL, which keeps nothing). A packed row's examples, a pass's
    label count and an unpacked batch's width are new lengths nearly every step: 400 attention calls of random
    lengths up to 256 grew a process by 1.35 GB, matmuls of random row counts by 540 MB; at lengths rounded up
    to 32 by ~30 MB (docs/performance.md). The few padded positions cost less than the kernels they spare."""
    if t.device.type != "cpu" or t.element_size() != 2 or not t.is_floating_point():
        return n
    return -(-n // SHAPE_BUCKET) * SHAPE_BUCKET
