"""Where cells run. Every cell runs in a process of its own, so its peak memory is its own and a crash
(or an out-of-memory kill) takes down that cell only.

  local  (default) one cell after another on this machine. start_method:
           forkserver  (Linux default without a GPU) a server process imports torch / transformers / peft
                       once and forks a fresh child per cell: the same isolation, without ~5-10 s of imports
                       per cell
           spawn       `python -m tunelab.compare.cell CELL.json` per cell (the cleanest; any OS; the
                       default where CUDA is visible, since a forked child cannot use CUDA once the
                       server's imports have touched it)
  ray    cells fanned out over a Ray cluster (`ray.init(address=...)`, or a local one). Each Ray task runs
         its cell with `spawn`. The grid folder must be on a file system every node sees.

Ctrl-C (or SIGTERM): the running cell gets one SIGINT, checkpoints (the training loop does that) and
exits; the grid then stops. Cells run in their own session, so a terminal Ctrl-C reaches them only
through this forwarding, exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tunelab.config import ConfigError

# Imported once by the forkserver (every cell needs them): each saves seconds per cell.
PRELOAD = [
    "tunelab",  # first: its import drops a bitsandbytes notice that peft's import would print (tunelab/__init__.py)
    "torch",
    "transformers",
    "peft",
    "sklearn.metrics",
    "scipy.stats",
    "tunelab.compare.cell",
    "tunelab.training.loop",
    "tunelab.stages.lm",
    "tunelab.stages.classification",
    "tunelab.stages.runs",
    "tunelab.methods",
    "tunelab.data",
    "tunelab.evaluation.runner",
    "tunelab.metrics",
]


def _write_spec(spec: dict) -> Path:
    cell_dir = Path(spec["cell_dir"])
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / "cell.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def read_result(spec: dict, returncode: int | None = None) -> dict:
    """The cell's result.json; a crashed process (no final result) becomes a failed result."""
    path = Path(spec["cell_dir"]) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"key": spec["key"], "status": "running"}
    if result.get("status") == "running":
        if returncode is not None and returncode < 0:
            why = f"killed by signal {-returncode}" + (" (out of memory?)" if -returncode == signal.SIGKILL else "")
        else:
            why = f"exited with code {returncode}"
        result.update(status="failed", error=f"cell process {why} before writing its result; see {path.parent}/log.txt")
    return result


def add_exit_time(result: dict, ended_at: float, launched_at: float) -> dict:
    """The executor's part of the split: `ended_at - launched_at` (time.time()) is the process's whole life;
    what the cell did not measure itself (it ended after the result was written) becomes the phase "exit"."""
    if not result.get("phases") or result.get("wall_s") is None:
        return result
    life = max(ended_at - launched_at, 0.0)
    exit_s = max(life - result["wall_s"], 0.0)
    phases = {**result["phases"], "exit": round(exit_s, 3)}
    return {**result, "phases": phases, "wall_s": round(result["wall_s"] + exit_s, 2),
            "wall_s_total": round((result.get("wall_s_total") or 0.0) + exit_s, 2)}  # fmt: skip


def _write_result(spec: dict, result: dict) -> None:
    path = Path(spec["cell_dir"]) / "result.json"
    tmp = path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def _child(spec_path: str, log_path: str) -> None:  # forkserver target
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from tunelab.compare.cell import main

    code = main([spec_path])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # through multiprocessing's own exit path (it releases what the cell registered)


def _cuda_visible() -> bool:
    # without a GPU's device node (NVIDIA, AMD's ROCm, WSL's) torch sees none: then no torch import here (~2 s,
    # and a core taken from the forkserver's own imports)
    if sys.platform.startswith("linux") and not any(
        os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
    ):
        return False
    import torch

    return torch.cuda.is_available()


class LocalExecutor:
    name = "local"

    def __init__(self, start_method: str | None = None):
        import multiprocessing as mp

        if start_method is None:
            start_method = "forkserver" if sys.platform.startswith("linux") and not _cuda_visible() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start method {start_method!r}: use forkserver or spawn")
        if start_method == "forkserver" and "forkserver" not in mp.get_all_start_methods():
            start_method = "spawn"
        self.start_method = start_method
        self._ctx = None

    def warm(self) -> None:
        """Start the forkserver now: its imports then run beside whatever the grid does first (the
        references), not at the start of the first cell."""
        if self.start_method != "forkserver":
            return
        self._context()
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def _context(self):
        if self._ctx is None:
            import multiprocessing as mp

            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(PRELOAD)
        return self._ctx

    def run_one(self, spec: dict) -> tuple[dict, bool]:
        """(result, interrupted_by_user)."""
        spec = {**spec, "launched_at": time.time()}  # the cell measures its start-up from here
        path = _write_spec(spec)
        log_path = Path(spec["cell_dir"]) / "log.txt"
        if self.start_method == "spawn":
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tunelab.compare.cell", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                code, interrupted = _wait(proc.pid, proc.wait)
        else:
            proc = self._context().Process(target=_child, args=(str(path), str(log_path)), name=f"cell-{spec['key']}")
            proc.start()

            def join():
                proc.join()
                return proc.exitcode

            code, interrupted = _wait(proc.pid, join)
        result = add_exit_time(read_result(spec, code), time.time(), spec["launched_at"])
        if result.get("phases"):
            _write_result(spec, result)
        return result, interrupted

    def run(self, specs: list[dict], on_start: Callable, on_done: Callable) -> None:
        for spec in specs:
            on_start(spec)
            result, interrupted = self.run_one(spec)
            on_done(spec, result)
            if interrupted or result.get("status") == "interrupted":
                raise KeyboardInterrupt


def _wait(pid: int, wait: Callable[[], int]) -> tuple[int, bool]:
    """Wait for the cell process; on Ctrl-C forward one SIGINT, wait for its checkpoint; a second Ctrl-C kills it."""
    try:
        return wait(), False
    except KeyboardInterrupt:
        print("\n[compare] interrupted: letting the running cell write its checkpoint ...", file=sys.stderr, flush=True)
        _signal(pid, signal.SIGINT)
        try:
            return wait(), True
        except KeyboardInterrupt:
            _signal(pid, signal.SIGKILL)
            return wait(), True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------- ray
def _ray_cell(spec: dict) -> dict:
    """A Ray task: run one cell in a fresh process on the worker's machine."""
    result, _ = LocalExecutor("spawn").run_one(spec)
    return result


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address

    def run(self, specs: list[dict], on_start: Callable, on_done: Callable) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray, which is not installed: pip install 'tunelab[ray]' (or pip install ray)"
            ) from None
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(_ray_cell)
        pending: dict = {}
        for spec in specs:
            threads = ((spec.get("config") or {}).get("training") or {}).get("threads") or 1
            device = str(((spec.get("config") or {}).get("training") or {}).get("device") or "auto")
            gpus = 1 if device.startswith("cuda") else 0
            on_start(spec)
            pending[remote.options(num_cpus=threads, num_gpus=gpus).remote(spec)] = spec
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    spec = pending.pop(ref)
                    on_done(spec, self._get(ray, ref, spec))
        except KeyboardInterrupt:
            print("\n[compare] interrupted: cancelling Ray cells (running ones checkpoint) ...", file=sys.stderr)
            for ref in pending:
                ray.cancel(ref, force=False)
            for ref, spec in pending.items():
                result = self._get(ray, ref, spec)
                if result.get("status") in ("done", "failed", "interrupted"):
                    on_done(spec, result)
            raise

    @staticmethod
    def _get(ray, ref, spec: dict) -> dict:
        try:
            return ray.get(ref)
        except Exception as e:  # noqa: BLE001 - cancelled or a worker crash: fall back on the cell's own file
            result = read_result(spec)
            if result.get("status") == "failed" and "before writing" in str(result.get("error")):
                result["error"] = f"ray: {type(e).__name__}: {e}"
            if "TaskCancelled" in type(e).__name__ and result.get("status") == "failed":
                result["status"], result["error"] = "interrupted", "cancelled before it finished"
            return result


def executor_for(name: str, address: str | None = None, start_method: str | None = None):
    if name == "local":
        return LocalExecutor(start_method)
    if name == "ray":
        return RayExecutor(address)
    raise ConfigError(f"unknown executor {name!r}: use local or ray")
