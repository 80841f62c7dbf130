"""Data-parallel training over several processes: what the one loop (loop.py) needs to scale out.

Launch `tunelab train CONFIG --nproc N` (spawns torchrun on this machine), or `torchrun` /
`accelerate launch` for several machines (docs/scale.md). Every process runs the same loop; a
`Dist` turns it into data-parallel training and does nothing at all in a single process:

- data: the global batch order is the single-process one with batch N*b (`batch_order` with the
  global batch); process r takes its slice of every micro-batch, so N processes x batch b train
  like one process x batch N*b. A process whose slice is empty (a last batch with fewer than N
  rows) runs a stand-in row with weight 0, so every process does the same forward/backward calls.
- loss: the step's label count is summed over processes (all_reduce) and each process
  backpropagates loss_sum_r * N / n_global; DDP averages gradients (/N), which leaves
  sum_r loss_sum_r / n_global: exactly the gradient of the one big batch (loss.py explains why the
  loop normalises by label tokens, not per micro-batch).
- gradient accumulation: `no_sync` on every micro-batch but the last, so gradients are all-reduced
  once per optimizer step; clipping sees the synchronised gradients.
- rank 0 writes logs, metrics.jsonl, checkpoints (atomically, then a barrier) and final/; every
  process loads the checkpoint on resume; validation loss is sharded by batch and summed.

The wrapping is accelerate's (`Accelerator.prepare`): DDP (gloo on CPU, NCCL on CUDA) here, and the
same calls give FSDP or DeepSpeed when `accelerate launch --config_file examples/accelerate/...`
asks for them (documented, not tested here: no GPU). The loss functions call a causal LM's
backbone and head directly (loss.py), bypassing `model.forward`, so the wrapped module is a small
`LossModule` whose forward *is* the stage's loss: DDP and FSDP hooks see every forward pass.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from tunelab.config import ConfigError
from tunelab.models.loading import unwrap
from tunelab.training import checkpoint as ckpt


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


class LossModule(torch.nn.Module):
    """forward(batch) = stage.loss_sum(model, batch): the unit DDP / FSDP / DeepSpeed wrap."""

    def __init__(self, model, loss_sum):
        super().__init__()
        self.model = model
        self.loss_sum = loss_sum
        inner = unwrap(model)
        # FSDP's default auto-wrap policy shards the blocks the model names here (LlamaDecoderLayer ...)
        self._no_split_modules = getattr(inner, "_no_split_modules", None)

    def forward(self, batch):
        return self.loss_sum(self.model, batch)


class NullLog:
    """The metrics log of processes other than rank 0."""

    def write(self, record: dict, section: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


class Dist:
    """One process of a data-parallel run (world_size 1: every method is the plain single-process step)."""

    def __init__(self, device: torch.device, tcfg):
        self.world_size, self.rank = world_size(), rank()
        self.is_main = self.rank == 0
        self.deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
        self.sharded = _flag("ACCELERATE_USE_FSDP") or self.deepspeed  # parameters live in shards
        self.acc = None
        self.module = None  # the wrapped LossModule (multi-process)
        self.model = self.loss_fn = None
        self._trainable: tuple = ()
        self._resumed = False
        self.tcfg = tcfg
        self.device = device
        if self.world_size == 1 and not self.sharded:
            return
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ConfigError(
                    f"process {self.rank} wants GPU {local} but this machine has {torch.cuda.device_count()}: "
                    "start at most one process per GPU (--nproc / --nproc_per_node)"
                )
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        elif device.type != "cpu":
            raise ConfigError(f"multi-process training runs on CUDA (NCCL) or CPU (gloo), not on {device.type}")
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # find_unused_parameters: a micro-batch may leave a trainable tensor unused (a causal LM's
        # head when a shard holds no label token), which plain DDP reports as an error at the next step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        # cpu=True: without it accelerate treats CPU processes as independent single-process runs.
        # DeepSpeed accumulates gradients itself (and divides the loss by the steps: see backward).
        self.acc = Accelerator(
            cpu=device.type == "cpu", gradient_accumulation_steps=tcfg.grad_accum if self.deepspeed else 1,
            kwargs_handlers=[ddp],
        )  # fmt: skip
        self.device = self.acc.device

    @property
    def multi(self) -> bool:
        return self.acc is not None

    def describe(self) -> str:
        kind = "FSDP/DeepSpeed" if self.sharded else "DDP"
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        return f"{self.world_size} processes, {kind} over {backend}, this is rank {self.rank} on {self.device}"

    # ------------------------------------------------------------------ setup
    def check(self, cfg, method, resume: bool) -> None:
        """Refuse, up front and clearly, what the multi-process paths do not support."""
        if not self.sharded:
            return
        if self.deepspeed and cfg.training.rows_per_pass:
            raise ConfigError(
                "training.rows_per_pass: DeepSpeed counts every backward pass as a micro-batch of its own; "
                "set training.rows_per_pass: null and lower training.batch_size (raising grad_accum) instead"
            )
        if cfg.training.save_every or cfg.training.saves_per_epoch or resume:
            raise ConfigError(
                "training.save_every / saves_per_epoch / --resume: resumable checkpoints are written for single-process "
                "and DDP runs; under FSDP / DeepSpeed the weights and optimizer state are sharded. Set "
                "training.save_every and saves_per_epoch: null, "
                "or use DDP (tunelab train --nproc N)"
            )
        caps = method.CAPABILITIES
        if caps.changes_trainables:
            raise ConfigError(
                f"method {cfg.method.name} changes which parameters train during the run, which FSDP / DeepSpeed "
                "cannot follow once parameters are sharded: use DDP (tunelab train --nproc N)"
            )
        if caps.quantized_base:
            raise ConfigError(
                f"method {cfg.method.name} under FSDP / DeepSpeed needs 4-bit weights stored as bfloat16 "
                f"(bnb_4bit_quant_storage), which tunelab's {cfg.method.name} does not set: use DDP "
                "(tunelab train --nproc N), one 4-bit copy per GPU"
            )

    def prepare(self, model, stage, optimizer):
        """Wrap the model for training; returns the optimizer to step (accelerate's wrapper when sharded)."""
        self.model, self.loss_fn = model, stage.loss_sum
        if not self.multi:
            return optimizer
        self._trainable = self._trainable_set()
        if not self._resumed and self.rank > 0:
            # each process its own dropout / masking draws (accelerate's set_seed(device_specific=True)),
            # seeded after the model is built so that every process starts from the same weights; rank 0
            # goes on with the single-process stream. A resume restores every process's own state instead.
            torch.manual_seed(torch.initial_seed() + self.rank)
        if self.deepspeed:  # the loop's settings, whatever the accelerate config file says
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.tcfg.batch_size
            ds["gradient_accumulation_steps"] = self.tcfg.grad_accum
            ds["gradient_clipping"] = self.tcfg.max_grad_norm or 0.0
        if self.sharded:  # FSDP / DeepSpeed re-point the optimizer at the sharded parameters
            self.module, optimizer = self.acc.prepare(LossModule(model, stage.loss_sum), optimizer)
        else:
            self.module = self.acc.prepare_model(LossModule(model, stage.loss_sum))
        return optimizer

    def _trainable_set(self) -> tuple:
        return tuple(p.requires_grad for p in self.model.parameters())

    def refresh(self) -> None:
        """Re-wrap after a method changed which parameters train (gradual unfreezing): DDP registers its
        gradient hooks for the trainable parameters it saw when it was built."""
        if not self.multi or self._trainable == self._trainable_set():
            return
        self._trainable = self._trainable_set()
        self.acc.free_memory()  # accelerate keeps a reference to every prepared model: drop the stale DDP
        self.module = self.acc.prepare_model(LossModule(self.model, self.loss_fn))

    # ------------------------------------------------------------------ one optimizer step
    def shard(self, rows: list[int]) -> tuple[list[int], float]:
        return shard(rows, self.rank, self.world_size)

    def loss_sum(self, batch):
        return self.module(batch) if self.multi else self.loss_fn(self.model, batch)

    def no_sync(self, skip_sync: bool):
        """Around forward *and* backward of a micro-batch: DDP decides in forward whether backward syncs."""
        return self.acc.no_sync(self.module) if self.multi and skip_sync else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if not self.multi:
            loss.backward()
            return
        # the loop divides by the global label count, and every gradient reduction averages (/N)
        loss = loss * self.world_size
        if self.deepspeed:  # DeepSpeed divides each micro-batch's loss by its accumulation steps
            loss = loss * self.tcfg.grad_accum
        self.acc.backward(loss)

    def clip_grad_norm_(self, params, max_norm: float, optimizer=None) -> float | None:
        if not self.multi and hasattr(optimizer, "clip_grad_norm_"):  # bf16 weights: the factor applied in its step
            return float(optimizer.clip_grad_norm_(max_norm))
        if not self.multi:
            return float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))
        if self.sharded:  # FSDP clips its shards with one all-reduce of the norm; DeepSpeed clips itself
            norm = self.acc.clip_grad_norm_(self.module.parameters(), max_norm)
        else:
            norm = self.acc.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        return None if norm is None else float(norm)

    def sum(self, *values: float) -> list[float]:
        """The sums over all processes (one all_reduce for several numbers)."""
        if not self.multi:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_loss(self, model, batches: list[dict], autocast, to_device, extras: dict | None = None) -> float:
        """The loop's evaluate_loss over all processes: each scores every N-th validation batch and the
        sums and counts are added up. The shorter shares are padded with weight-0 batches: sharded models
        run through the wrapped module, where every process takes part in every forward, and every process
        must know the stage's extra metrics to add them up."""
        mine = [(b, 1.0) for b in batches[self.rank :: self.world_size]]
        mine += [(batches[0], 0.0)] * (math.ceil(len(batches) / self.world_size) - len(mine))
        net = self.module if self.sharded else model
        was_training = net.training
        net.eval()
        total, count, sums = 0.0, 0.0, {}
        for batch, weight in mine:
            batch = to_device(batch, self.device)
            with autocast():
                loss_sum, n, *more = self.module(batch) if self.sharded else self.loss_fn(model, batch)
            total += weight * float(loss_sum)
            count += weight * n
            for k, v in (more[0] if more else {}).items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        net.train(was_training)
        keys = sorted(sums)  # the stage's extra metrics: the same names in every process
        total, count, *values = self.sum(total, count, *(sums[k] for k in keys))
        if extras is not None:
            extras.update({k: v / max(count, 1) for k, v in zip(keys, values)})
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run_dir, model, optimizer, scheduler, state: dict, keep: int, rng=None, together=True):
        """Rank 0 writes (atomically, checkpoint.py); `together`: every process adds its RNG state and
        waits at a barrier. An interrupt saves with together=False: rank 0 alone, no collective call
        (the other processes may be gone), and a resume gives every process rank 0's RNG state."""
        if not self.multi:
            return ckpt.save_checkpoint(run_dir, model, optimizer, scheduler, state, keep=keep, rng=rng)
        latest = ckpt.latest_checkpoint(run_dir)
        if not together and latest is not None and latest.name == f"step-{state['step']:08d}":
            return latest  # written together at this very step (save_every), with every process's RNG: keep it
        rng = rng or ckpt.rng_state()
        if together:
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, rng)
            rng = {**rng, "ranks": states}
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(run_dir, model, optimizer, scheduler, state, keep=keep, rng=rng)
        if together:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path, model, optimizer, scheduler, global_batch: int) -> dict:
        """Every process loads rank 0's checkpoint, then its own RNG state when the checkpoint holds one."""
        state = ckpt.load_checkpoint(path, model, optimizer, scheduler)
        saved = state.get("global_batch", global_batch)
        if saved != global_batch:
            raise ConfigError(
                f"{path} was written with a global batch of {saved} (batch_size x processes); this run has "
                f"{global_batch}. Resume with the same processes, or set training.batch_size so that "
                "batch_size x processes stays the same: the data order depends on it"
            )
        if self.multi:
            # mmap: read the small RNG entry without loading the optimizer state a second time
            rng = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)["rng"]
            ranks = rng.get("ranks") or []
            if len(ranks) == self.world_size:
                ckpt._set_rng_state(ranks[self.rank])
            self._resumed = True
        return state

    # ------------------------------------------------------------------ the end
    def gathered_model(self, cfg, stage, method):
        """Sharded runs: the trained weights in one model on rank 0 (None elsewhere), rebuilt on the CPU
        from the full state dict accelerate gathers (every process must call this)."""
        full = self.acc.get_state_dict(self.module)
        if not self.is_main:
            return None
        return rebuild(cfg, stage, method, full)

    def close(self) -> None:
        """Drop the wrapped model. The process group stays up until the process exits (atexit): a later
        `train` in this process (a sweep under torchrun) reuses it, since joining the launcher's
        rendezvous a second time would wait forever."""
        if not self.multi:
            return
        self.acc.free_memory()
        self.module = None
        if not _exit_hook:
            import atexit

            atexit.register(_destroy_process_group)
            _exit_hook.append(True)


_exit_hook: list = []


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(rows: list[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """Process `rank`'s contiguous slice of a global micro-batch, and its weight. The slices differ in
    size by at most one row; an empty one becomes a stand-in row with weight 0 (DDP needs every
    process in every backward)."""
    lo, hi = rank * len(rows) // world_size, (rank + 1) * len(rows) // world_size
    return (rows[lo:hi], 1.0) if hi > lo else (rows[:1], 0.0)


def rebuild(cfg, stage, method, state_dict: dict, device: str = "cpu"):
    """A fresh model with the method applied, holding `state_dict` (a LossModule's, "model." prefixed, or
    the model's own): what a sharded run saves, since its own modules only hold shards."""
    model, _ = stage.load_model(cfg, torch.device(device))
    model = method.apply(model, cfg.method)
    state = {k.removeprefix("model."): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if dict(model.named_parameters()).get(k) is not None]:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def launch(nproc: int, argv: list[str]) -> int:
    """`tunelab train ... --nproc N`: run `tunelab <argv>` in N processes on this machine through torchrun
    (it ships with torch, needs no config file, finds a free port, and stops every process when one fails)."""
    import subprocess
    import sys

    env = dict(os.environ)
    # torchrun would set 1 thread and warn; split the cores between the processes instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*cmd, "-m", "tunelab.cli", *argv], env=env)
