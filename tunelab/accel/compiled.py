"""C loops compiled at first use: where one pass in C replaces several PyTorch ops on a CPU.

A few steps are memory-bound chains of elementwise ops that PyTorch runs as separate passes, each with a dispatch
and, in bf16, a widening and a rounding (AdamW with stochastic rounding: sr_adamw.py, the one user so far; a
SwiGLU backward so written ran slower than ATen's vectorised ops and was not kept, docs/performance.md).
torch.compile would fuse them but needs a C++ compiler too, compiles for seconds per shape, and its
code for the rounding step measured no faster. So each such step is a short C function here: compiled by the
system's C compiler (`$CC`, else `cc` or `gcc`) with `-O3 -march=native` (0.1 s) into `$TUNELAB_HOME/kernels/`,
under a key of the source, flags, compiler and the CPU's feature flags (a home shared by different machines gets
a build for each), written atomically; called through ctypes, which lets go of the GIL, so `split` runs a long
tensor's halves in two threads at once. No compiler or a failed build: `load` returns None, `why_not` says why,
and the caller runs its PyTorch ops (the run log says so).

A cached library is code this process runs: it is loaded only from a folder and file that this user (or root) owns
and nobody else can write to (as ssh treats its keys); the folder is made so, and a file that is not is refused
with the fix in `why_not` (the PyTorch step runs meanwhile).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from tunelab.models.sources import tunelab_home

# no fused multiply-adds (gcc contracts a * b + c by default, clang 14 does not): the same bits from any compiler,
# optimisation level or vector width, so a run resumes the same after its home's build changes (tested)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]
SPLIT = 1 << 16  # elements: a tensor this long or longer is split among the threads

# bf16 <-> fp32 for the sources that take bf16 tensors: narrowing rounds to nearest even, as torch does (an arithmetic
# NaN stays one: its payload bits are high)
BF16 = r"""
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}
static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
"""

_loaded: dict = {}  # name -> SimpleNamespace of ctypes functions, or the str why there is none
_pools: dict = {}  # threads -> ThreadPoolExecutor


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(name: str, source: str, cache: Path | None = None) -> Path:
    """The compiled library of `source`, compiled now unless a build for it, this compiler and this CPU is
    cached. Without -march=native where the compiler refuses it (e.g. an older clang); RuntimeError (why) when
    there is no compiler or no build succeeds."""
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise RuntimeError("no C compiler (cc or gcc on PATH, or $CC)")
    key = hashlib.sha256("\0".join([source, *FLAGS, *cc, platform.machine(), _cpu_flags()]).encode()).hexdigest()
    cache = cache or tunelab_home() / "kernels"
    lib = cache / f"{name}-{key[:16]}.so"
    _private(cache)
    if lib.exists():
        if why := _untrusted(lib):
            raise RuntimeError(f"{lib} not loaded: {why}; delete it (a new one is compiled) or make it yours alone "
                               f"(chown $USER, chmod go-w)")  # fmt: skip
        return lib
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            try:
                done = subprocess.run([*cc, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
                                      timeout=120)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"{cc[0]} did not run: {e}") from None
            if done.returncode == 0:
                out.chmod(0o755)  # whatever the umask: nobody else may write it (module doc)
                os.replace(out, lib)  # atomic: another process building the same key meanwhile finds a whole file
                return lib
        raise RuntimeError(f"{cc[0]} failed: {done.stderr.strip()[-300:]}")


def _private(folder: Path) -> None:
    """`folder` made (or, when this user owns it, kept) writable by its owner alone; refused when another user
    owns it or it stays writable by others."""
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    if os.name != "posix":
        return
    st = folder.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o022:
        folder.chmod(st.st_mode & ~0o022 & 0o7777)  # e.g. made under umask 002
    if why := _untrusted(folder):
        raise RuntimeError(f"{folder}: {why}; compiled code is not loaded from there (set $TUNELAB_HOME to a folder "
                           f"of your own)")  # fmt: skip


def _untrusted(path: Path) -> str:
    """Why another user could have written `path` ('' when only this user or root could), on POSIX."""
    if os.name != "posix":
        return ""
    st = path.stat()
    if st.st_uid not in (os.getuid(), 0):
        return f"owned by another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {st.st_mode & 0o777:o})"
    return ""


def load(name: str, source: str, signatures: dict[str, list]) -> SimpleNamespace | None:
    """The functions of `source` (name -> ctypes argument types; they return nothing), or None: `why_not(name)`
    then says why. Built once per process."""
    if name not in _loaded:
        try:
            lib = ctypes.CDLL(str(build(name, source)))
            fns = {}
            for fn_name, argtypes in signatures.items():
                fn = getattr(lib, fn_name)
                fn.restype, fn.argtypes = None, argtypes
                fns[fn_name] = fn
            _loaded[name] = SimpleNamespace(**fns)
        except (RuntimeError, OSError, AttributeError) as e:
            _loaded[name] = str(e)
    found = _loaded[name]
    return None if isinstance(found, str) else found


def why_not(name: str) -> str:
    found = _loaded.get(name, "")
    return found if isinstance(found, str) else ""


def run(fn, n: int, *args, threads: int, per: int = 1) -> None:
    """`split`, waiting for every call."""
    for future in split(fn, n, *args, threads=threads, per=per):
        future.result()


def split(fn, n: int, *args, threads: int, per: int = 1) -> list:
    """`fn(start, stop, *args)` over [0, n): one call here for a short range (under SPLIT elements, an index covering
    `per` of them) or one thread (returns []), else `threads` calls at once in a pool shared by every caller (returns
    their futures)."""
    if threads <= 1 or n * per < SPLIT:
        fn(0, n, *args)
        return []
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tunelab-c")
    per = -(-n // threads)
    return [_pools[threads].submit(fn, start, min(n, start + per), *args) for start in range(0, n, per)]
