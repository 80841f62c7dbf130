"""Resumable checkpoints, written atomically.

A checkpoint holds what is needed to continue exactly: the trainable weights (safetensors), the
optimizer and scheduler state, the step (which fixes the data position, since the data order is a
pure function of seed and epoch) and every RNG state. It is written into a temporary folder and
renamed into place, so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.config import ConfigError, OutputWriteError
from tunelab.methods.base import trainable_state

STATE_FILE = "tunelab_state.json"
# What checkpoints written before the rename call the loop state. Hugging Face Trainer's tools read a file of
# that name with another layout (log_history, best_metric ...), so it is read when resuming, never written.
OLD_STATE_FILE = "trainer_state.json"


def state_file(path: Path) -> Path | None:
    """The loop-state file of a checkpoint folder (the current name, else the old one), or None."""
    for name in (STATE_FILE, OLD_STATE_FILE):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob("step-*") if state_file(p) is not None) if root.exists() else []
    return done[-1] if done else None


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain ints/lists so torch.load(weights_only=True) can read it back
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, loop_state: dict, keep: int = 2, rng: dict | None = None
) -> Path:
    """Write checkpoints/step-N atomically. A failed write (disk full, read-only folder) is an
    OutputWriteError naming the folder and the last complete checkpoint, which is left untouched."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{loop_state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.contiguous().cpu() for k, v in trainable_state(model).items()}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state()},
            tmp / "optimizer.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps(loop_state, indent=2))
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(f"cannot write the checkpoint {final}", e, run_dir) from None
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`; an existing `final` is set aside first and removed only
    once the new one is in place, so a failure leaves the old one."""
    aside = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_error(what: str, e: OSError, run_dir: Path) -> OutputWriteError:
    """A user's error for a failed write: what, why (disk full, read-only ...), and what is left."""
    reason = e.strerror or str(e)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    last = latest_checkpoint(run_dir)
    left = (
        f"the last complete checkpoint is {last} (continue with --resume once there is room)"
        if last is not None
        else "no complete checkpoint was written before"
    )
    return OutputWriteError(f"{what}: {reason}{where}; free space or make the folder writable; {left}")


def saved_master_weights(path: Path) -> str | None:
    """ "bf16" or "fp32": what a checkpoint's trainable floating-point weights were kept in (a bf16 run's
    `training.master_weights` choice, tunelab/training/bf16_adamw.py), read off the safetensors header; None when
    it cannot tell. A resumed `auto` run keeps its start's choice, whatever the host or version."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "trainable.safetensors"), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except OSError:
        return None
    # fp32 master weights make every trainable weight fp32; bf16 weights leave a norm kept in fp32 beside them
    return "bf16" if "BF16" in dtypes else "fp32" if dtypes == {"F32"} else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the loop state (tunelab_state.json, or
    trainer_state.json in a checkpoint written before the rename)."""
    path = Path(path)
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise ConfigError(f"{path}: checkpoint has weights the model lacks ({missing[:3]}...); was the method changed?")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    # weights_only=True: tensors and plain containers only, never arbitrary pickled objects.
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return json.loads(state_file(path).read_text())
