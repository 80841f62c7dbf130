"""The harness every training loop shares (training/loop.py, training/ppo.py): the run folder and its
config, seeds, the metrics log, the progress bar, precision, optimizer and schedule, the result folder,
signals. Public names only: a loop imports what it uses from here, and nothing else private.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab import files
from tunelab.config import ConfigError, dump_config
from tunelab.methods.base import adamw_groups
from tunelab.models import precision as precisions
from tunelab.models.precision import choose_precision
from tunelab.training import checkpoint as ckpt
from tunelab.training import distributed, trackers
from tunelab.training.card import write_card


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path | None
    metrics: dict = field(default_factory=dict)
    # seconds per part of the run (load, data, eval, train, save, score): a compare cell's time split
    phases: dict = field(default_factory=dict)


@contextlib.contextmanager
def timed(phases: dict, name: str):
    """Add the seconds the block takes to phases[name], also when it raises (a Ctrl-C mid-step)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


def log(msg: str) -> None:
    if distributed.rank() == 0:  # one voice in a multi-process run
        print(f"[tunelab] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_order(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def optimizer_for(params, tcfg, lr_scales: dict | None = None, bf16_state: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors), as is standard; `lr_scales` (the method's
    hook: LoRA+) gives some parameters a learning rate of their own.

    A parameter that is frozen for now (gradual unfreezing) has no gradient, and AdamW skips it. bf16 weights that
    train (`training.master_weights`: bf16, see master_weights_choice) take AdamW with stochastic rounding; so do
    fp32 weights whose gradients and moments are kept in bf16 (`bf16_state`: optimizer_state_choice).
    """
    params = list(params)
    groups = adamw_groups(params, tcfg.weight_decay, tcfg.lr, lr_scales)
    if not groups:
        raise ConfigError("the method left no trainable parameters")
    if bf16_state or any(p.dtype == torch.bfloat16 for p in params):
        from tunelab.training.bf16_adamw import BF16AdamW

        # accelerate: auto: the step as one compiled loop on a CPU (tunelab/accel/sr_adamw.py)
        compiled = tcfg.accelerate == "auto"
        return BF16AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), seed=tcfg.seed, compiled=compiled,
                         bf16_state=bf16_state)  # fmt: skip
    # the fused kernel on CPU too (TRL's default, adamw_torch_fused): one pass over each tensor where the for-loop
    # form walks it several times; 97 against 436 ms a step for SmolLM2-135M's 134.5M weights on 2 cores, the same
    # update to rounding (docs/performance.md). Not for a device torch has no fused kernel for.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), fused=fused or None)


def scheduler_for(optimizer, tcfg, total_steps: int):
    from transformers import get_scheduler

    warmup = tcfg.warmup_steps if tcfg.warmup_steps is not None else int(tcfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[tcfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The records of a metrics.jsonl up to a step. A missing file (deleted by hand) or a torn last
    line (the process killed mid-write) loses those lines, never the resume."""
    if not path.exists():
        log(f"{path} is missing: the resumed run's metrics start at the checkpoint")
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log(f"{path}:{n}: not a JSON line (a write cut short?); dropped")
            continue
        if isinstance(record, dict) and record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl (always) and the trackers of `training.report_to` (training/trackers.py), one place for all:
    each numeric value of a record goes to every tracker under its tracker name (train/loss, eval/loss ...).
    Also samples.jsonl (`file`, cfg None: no trackers), whose lines past a resumed checkpoint are dropped alike."""

    def __init__(self, run_dir: Path, cfg, resume_step: int, file: str = "metrics.jsonl"):
        self.path = run_dir / file
        if resume_step == 0:
            self.path.write_text("")
        else:  # drop lines past the checkpoint so a resumed log has no duplicate steps
            self.path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(self.path, resume_step)))
        self.trackers = trackers.start(run_dir, cfg, resume_step) if cfg is not None else []

    def write(self, record: dict, section: str = "train") -> None:
        """One line of metrics.jsonl; a key without an eval_ / dev_ prefix goes to the trackers under `section`."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {trackers.metric_name(k, section): v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        if values and self.trackers:
            with signals_deferred():  # a Ctrl-C inside a tracker's thread hand-off can stall its close (below)
                for t in self.trackers:
                    t.log(values, record["step"])

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def start_run(cfg, resume: bool, force: bool = False) -> tuple[Path, Path | None]:
    """Create the run folder (refusing to overwrite an earlier run unless resuming), write its
    config, set threads and seeds. Returns the run folder and the checkpoint to resume from.

    A resume must continue the same run: a changed seed, model, method, batch or data file is refused
    (listing what changed) unless `force`; run.json keeps what the first start used."""
    run_dir = Path(cfg.output_dir)
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    settings = run_settings(cfg)
    if resume_from is not None and not force:
        check_same_run(run_dir, settings)
    if resume and resume_from is None:
        log(f"no checkpoint in {run_dir / 'checkpoints'}; starting from the beginning")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir}: is a file, not a folder; choose another output_dir")
    if not resume and ckpt.latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints of an earlier run: pass --resume to continue it, "
            "or choose another output_dir"
        )
    if not resume and (run_dir / "final" / "tunelab.json").is_file() and (run_dir / "results.json").is_file():
        # a new run would replace its result without a word
        raise FileExistsError(
            f"{run_dir} holds a finished run (final/, results.json): choose another output_dir, or delete the "
            "folder to train it again (--resume continues only an unfinished run)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.rank() == 0:
            (run_dir / "config.yaml").write_text(dump_config(cfg))
            if resume_from is None or force:  # what this run's checkpoints were (or from now on are) made with
                files.write_json_atomic(run_dir / "run.json", settings)
    except OSError as e:  # under a file, read-only, disk full: before any model loads
        raise ConfigError(
            f"output_dir {run_dir}: cannot write the run folder ({e.strerror or e}); choose a folder you can write to"
        ) from None
    if distributed.rank() == 0:
        remove_stale_temporaries(run_dir)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    seed_everything(cfg.training.seed)
    return run_dir, resume_from


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the half-written checkpoint and result folders (checkpoints/.tmp-step-*, .tmp-final-*) a killed
    process left behind. One named after another live process on this machine may be in use: kept."""
    candidates = list(run_dir.glob(".tmp-final-*"))
    if ckpt.checkpoint_dir(run_dir).is_dir():
        candidates += ckpt.checkpoint_dir(run_dir).glob(".tmp-*")
    for path in sorted(candidates):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            log(f"{path} belongs to process {pid}, which is still running: left in place")
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        log(f"removed {path}, left incomplete by a process that stopped while writing it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def run_settings(cfg) -> dict:
    """What a resumed run must share with the run it continues, flat: {"training.seed": 0, ...}; a local
    data file by its content hash, so an edited file counts as a change."""
    out = {"stage": cfg.stage, "model.name": cfg.model.name, "model.revision": cfg.model.revision}
    if cfg.model.architecture:  # a model built from scratch: its shape and tokenizer are the model
        out.update({"model.architecture": cfg.model.architecture, "model.config": cfg.model.config,
                    "model.tokenizer": cfg.model.model_dump(mode="json")["tokenizer"]})  # fmt: skip
    out.update({f"method.{k}": v for k, v in cfg.method.model_dump().items()})
    t = cfg.training
    # the batch the data order depends on: rows per micro-batch over all processes (training/distributed.py
    # resumes a 2-process run in one process with twice the batch_size: the same batches)
    out["training.batch_size x processes"] = t.batch_size * distributed.world_size()
    out.update({"training.seed": t.seed, "training.grad_accum": t.grad_accum})
    sources = {"data.train": cfg.data.model_dump(mode="json")["train"], "data.validation": cfg.data.validation, "data.limit": cfg.data.limit,
               "task.name": cfg.task.name, "task.train_file": cfg.task.train_file, "task.dev_file": cfg.task.dev_file,
               "ppo.prompts": cfg.ppo.prompts}  # fmt: skip
    for key, value in sources.items():
        path = Path(str(value)).expanduser() if isinstance(value, str) else None
        out[key] = f"{value} (sha256 {_sha256(path)[:16]})" if path is not None and path.is_file() else value
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_same_run(run_dir: Path, settings: dict) -> None:
    saved_path = run_dir / "run.json"
    if not saved_path.exists():  # a run started before run.json existed: nothing to compare with
        return
    saved = json.loads(saved_path.read_text())
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k, v) != v]
    if changed:
        raise ConfigError(
            f"{run_dir}: --resume would continue this run with other settings than it started with: "
            + "; ".join(changed)
            + ". Resume with the original config, choose another output_dir for a new run, or pass --force "
            "to continue anyway (the result then mixes both settings)."
        )


def save_result(run_dir: Path, model, tokenizer, save, cfg, manifest_extra: dict, metrics: dict | None = None) -> Path:
    """Write the result (`save(model, folder)`, the method's own format), tokenizer, a small manifest and
    the model card (README.md: training/card.py, with `metrics`) atomically into run_dir/final. A failed
    write (disk full, read-only) is an OutputWriteError."""
    final = run_dir / "final"
    tmp = run_dir / f".tmp-final-{os.getpid()}"
    with checkpoint_write(run_dir, interrupting=True, what="the result"):  # the run ends right after anyway
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if manifest_extra.get("base_commit"):  # PEFT's AutoPeftModel loads the base at its config's revision
                for peft_cfg in (getattr(model, "peft_config", None) or {}).values():
                    peft_cfg.revision = peft_cfg.revision or manifest_extra["base_commit"]
            save(model, tmp)
            tokenizer.save_pretrained(tmp)
            manifest = {"method": cfg.method.name, "base_model": cfg.model.model_dump(), "stage": cfg.stage}
            manifest.update(manifest_extra)
            (tmp / "tunelab.json").write_text(json.dumps(manifest, indent=2))
            write_card(tmp, cfg, model, metrics or {}, manifest)  # replaces PEFT's blank template card
            ckpt.replace_dir(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.write_error(f"cannot write the result {final}", e, run_dir) from None
    return final


def write_results_json(run_dir: Path, metrics: dict) -> None:
    path = run_dir / "results.json"
    try:
        files.write_json_atomic(path, metrics)
    except OSError as e:
        raise ckpt.write_error(f"cannot write {path} (the result in final/ is complete)", e, run_dir) from None


def early_stop(state: dict, eval_loss: float | None, patience: int | None) -> bool:
    if eval_loss is None:
        return False
    if state["best_eval"] is None or eval_loss < state["best_eval"]:
        state["best_eval"] = eval_loss
        state["evals_without_improvement"] = 0
        return False
    state["evals_without_improvement"] += 1
    return bool(patience) and state["evals_without_improvement"] >= patience


no_autocast = contextlib.nullcontext


def autocast_for(device: torch.device, dtype: str):
    """The context of a forward pass for `model.dtype` (`dtype`) on `device`: bf16 autocast where the
    precision is mixed (models/precision.py: CUDA with bf16 under `auto`, CUDA or a CPU under `bfloat16`),
    else none. Autocast's state is per thread: a pass run in another thread enters it there."""
    p = choose_precision(dtype, device)
    if p.autocast:
        return lambda: torch.autocast(device.type, dtype=p.dtype)
    return no_autocast


def resolved_dtype(cfg, precision):
    """`cfg` with `model.dtype: auto` replaced by the dtype `precision` resolved it to (models/precision.py: the
    training loop resolves `auto` for LoRA runs, which the loader alone would not), else `cfg` itself."""
    if cfg.model.dtype != "auto":
        return cfg
    name = str(precision.dtype).removeprefix("torch.")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": name})})


# bytes a trainable weight adds once training starts, over the weight as loaded: in bf16 with fp32 master weights an
# fp32 copy (+2), its fp32 gradient (4) and AdamW's two fp32 moments (8); kept in bf16, a bf16 gradient (2) and
# moments (4); in an fp32 run, the gradient (4) and moments (8)
FP32_MASTER_BYTES, BF16_WEIGHT_BYTES, FP32_STATE_BYTES = 14, 6, 12


def master_weights_choice(setting: str, device, trainable: int, total: int, available: int | None,
                          own_weights: bool = True) -> tuple[bool, str]:  # fmt: skip
    """(keep the trainable weights in bf16, why) for `training.master_weights` in a bf16 run: explicit fp32 / bf16
    wins; auto takes bf16 when the fp32 copies would not fit in 80% of the memory `available`, or on a CPU when
    the method trains the model's `own_weights` (not a PEFT adapter beside them) and they are most of its `total`
    (full fine-tuning: there the fp32 copies double the run's memory and, measured on the bench job, buy no lower
    held-out loss; docs/performance.md)."""
    chosen, why = auto_bf16("master_weights", setting, device, trainable, total, available, own_weights,
                            FP32_MASTER_BYTES, "fp32 copies")  # fmt: skip
    return chosen, why or "auto: fp32 master weights"


def auto_bf16(key: str, setting: str, device, n: int, total: int, available: int | None, own_weights: bool,
              fp32_bytes: int, what: str) -> tuple[bool, str]:  # fmt: skip
    """(bf16, why; "" for auto's fp32) for `training.<key>` (master_weights, optimizer_state) over `n` trainable
    weights of `total`: explicit fp32 / bf16 wins; auto takes bf16 where `what` (`fp32_bytes` a weight) would not
    fit in 80% of the memory `available`, or on a CPU when the method trains the model's `own_weights` and they are
    most of it."""
    if setting != "auto":
        return setting == "bf16", f"training.{key}: {setting}"
    need = n * fp32_bytes
    if available is not None and need > 0.8 * available:
        return True, (
            f"auto: {what} of the {n:,} trainable weights would take {need / 2**30:.1f} GiB of the "
            f"{available / 2**30:.1f} GiB available"
        )
    if torch.device(device).type == "cpu" and own_weights and n > total / 2:
        return True, f"auto: {n / total:.0%} of the weights train, on a CPU"
    return False, ""


def optimizer_state_choice(setting: str, device, learning: list, total: int, own_weights: bool, multi: bool,
                           available: int | None) -> tuple[bool, str]:  # fmt: skip
    """(keep the gradients and AdamW moments of the fp32 weights that train in bf16, why) for
    `training.optimizer_state`: only where every weight in `learning` is fp32 (an fp32 run; a bf16 run's weights are
    kept as master_weights_choice says) and in one process (DDP all-reduces fp32 gradients). auto takes bf16 where the
    fp32 gradients and moments would not fit in 80% of the memory `available`, or on a CPU when the method trains
    the model's `own_weights` and they are most of its `total` (full fine-tuning: measured at the same held-out loss,
    docs/performance.md); not where TUNELAB_CPU_BF16_AUTO=0 switches auto's bf16 choices off (the test suite)."""
    if not learning or any(p.dtype != torch.float32 for p in learning):
        return False, ""
    if multi:
        why = "" if setting != "bf16" else "training.optimizer_state: bf16 is for one process: fp32 here"
        return False, why
    if setting == "auto" and not precisions.CPU_BF16_AUTO:
        return False, ""
    n = sum(p.numel() for p in learning)
    return auto_bf16("optimizer_state", setting, device, n, total, available, own_weights, FP32_STATE_BYTES,
                     "fp32 gradients and moments")  # fmt: skip


def master_weights_plan(setting: str, device, model, learning: list, mixed: bool, own_weights: bool,
                        bf16_state: bool = False):  # fmt: skip
    """(keep the trainable weights in bf16, why, the bytes of memory left once the gradients and AdamW's moments
    exist, or None if unknown) for a run whose `learning` parameters train; `mixed`: the passes run under bf16 or
    fp16 autocast (bf16 weights are a choice only in bf16: master_weights_choice); `bf16_state`: fp32 weights'
    gradients and moments kept in bf16 (optimizer_state_choice)."""
    n = sum(p.numel() for p in learning)
    available = available_memory()
    bf16, why = False, ""
    if mixed and any(p.dtype == torch.bfloat16 for p in learning):
        total = sum(p.numel() for p in model.parameters())
        bf16, why = master_weights_choice(setting, device, n, total, available, own_weights)
    if available is not None:
        # a weight already in fp32 (a PEFT adapter's, an fp32 run's) gets no fp32 copy: its gradient and moments only
        half = (torch.bfloat16, torch.float16)
        copies = sum(p.numel() for p in learning if mixed and not bf16 and p.dtype in half)
        per_weight = BF16_WEIGHT_BYTES if bf16 or bf16_state else FP32_STATE_BYTES
        available = max(available - n * per_weight - copies * (FP32_MASTER_BYTES - FP32_STATE_BYTES), 0)
    return bf16, why, available


def fp32_master_weights_(model, params=None) -> int:
    """Mixed precision: trainable bf16/fp16 parameters become fp32, frozen ones stay in half precision.

    On CUDA `model.dtype: auto` loads bf16 weights and autocast runs the matmuls in bf16. bf16 keeps 8
    bits of mantissa: a weight of 0.02 moves in steps of ~1e-4, so AdamW's updates (about lr, e.g. 2e-5)
    would round away. The weights that train therefore keep fp32, as in every mixed-precision recipe
    (PEFT does the same for adapters). Full fine-tuning thus trains and saves fp32 weights; LoRA
    keeps its bf16 base. `params`: every parameter that trains at some point of the run (a method's
    optimizer_parameters: gradual unfreezing thaws blocks later), default those that train now. Returns the
    number of parameters upcast.
    """
    n = 0
    for p in [p for p in model.parameters() if p.requires_grad] if params is None else params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += p.numel()
    # a LayerNorm whose bias trains and weight does not (bitfit on GPT-2): F.layer_norm takes a bf16 input with
    # fp32 weight and bias, but not the two in different dtypes ("expected scalar type BFloat16 but found Float")
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm) and m.weight is not None and m.bias is not None:
            if m.weight.dtype != m.bias.dtype:
                m.weight.data, m.bias.data = m.weight.data.float(), m.bias.data.float()
    return n


# floats a Llama-style block keeps per token for its backward pass: the two norms' and attention's inputs and
# outputs (q, k, v, attention output: ~6 x hidden) and the MLP's gate, up, activation and product (4 x intermediate)
HIDDEN_FLOATS, INTERMEDIATE_FLOATS = 6, 4
# of those, kept in bf16 with training.saved_activations: bf16 in an fp32 pass: the two norms' inputs, gate and up
NARROWED_HIDDEN, NARROWED_INTERMEDIATE = 2, 2


def activation_bytes(rows: int, length: int, config, bytes_per_value: int = 4, checkpointed: bool | int = False,
                     narrowed: bool = False) -> int:  # fmt: skip
    """Estimated bytes of the activations one forward pass keeps for its backward: rows x length tokens x
    layers x (HIDDEN_FLOATS x hidden + INTERMEDIATE_FLOATS x intermediate) values. Checkpointed (True: every
    layer; a number: that many layers): those layers keep their input only, plus one layer's activations while
    it is recomputed. `narrowed`: the NARROWED_* values kept in bf16 (training.saved_activations). An estimate
    (within ~2x for decoder LMs: attention kernels and the loss add their own), enough to tell 1 GB from 20."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0) or 0
    layers = num_layers(config)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or 4 * hidden
    per_layer = rows * length * (HIDDEN_FLOATS * hidden + INTERMEDIATE_FLOATS * inter) * bytes_per_value
    if narrowed and bytes_per_value > 2:
        per_layer -= rows * length * (NARROWED_HIDDEN * hidden + NARROWED_INTERMEDIATE * inter) * (bytes_per_value - 2)
    n = layers if checkpointed is True else min(int(checkpointed), layers)
    kept = rows * length * hidden * bytes_per_value  # a checkpointed layer's input
    return (layers - n) * per_layer + n * kept + (per_layer if n else 0)


def num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0) or 0


def available_memory() -> int | None:
    """Bytes the OS can give this process now without swapping (Linux: MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def narrowable(tcfg, model, bytes_per_value: int) -> bool:
    """Whether training.saved_activations: bf16 would narrow this run's saved activations: fp32 passes with
    accel on, over gated MLPs accel's SwiGLU function computes (`swiglu.is_swiglu`: Llama's, Gemma's)."""
    from tunelab.accel.swiglu import is_swiglu

    return tcfg.accelerate == "auto" and bytes_per_value == 4 and any(is_swiglu(m) for m in model.modules())


def saved_activations_choice(setting: str, bf16_state: bool, rows: int, length: int, config, available: int | None,
                             narrows: bool, share: float = 0.5) -> tuple[bool, str]:  # fmt: skip
    """(keep the saved activations narrowed to bf16, why) for `training.saved_activations`: bf16 / fp32 as set;
    auto = bf16 beside bf16 optimizer state (the run keeps its gradients in bf16 already), and, where the blocks
    `narrows` (narrowable), where a pass's fp32 activations would exceed `share` of the memory `available`: where
    checkpointing's auto would recompute layers (checkpointing_choice). Narrower activations cost no recomputation
    (they round what the backward pass reads to bf16), so they come first; checkpointing then recomputes only
    the layers they leave over the share. `why` is empty where nothing was decided by memory."""
    if setting != "auto":
        return setting == "bf16", ""
    if bf16_state:
        return True, ""
    need = activation_bytes(rows, length, config, 4)
    if not narrows or available is None or need <= share * available:
        return False, ""
    less = activation_bytes(rows, length, config, 4, narrowed=True)
    return True, (
        f"auto: bf16, activations ~{need / 2**30:.1f} GiB a pass in fp32 ({rows} rows x {length} tokens) > "
        f"{share:.0%} of the {available / 2**30:.1f} GiB available; ~{less / 2**30:.1f} GiB with the MLPs' gate and "
        "up outputs and the norms' inputs in bf16 (training.saved_activations: fp32 keeps them fp32)"
    )


def checkpointing_choice(setting, rows: int, length: int, config, bytes_per_value: int, available: int | None,
                         share: float = 0.5, layers: int | None = None, narrowed: bool = False) -> tuple[int, str]:  # fmt: skip
    """(how many layers to checkpoint, why) for `training.gradient_checkpointing` and `checkpoint_layers`
    (`layers`): 0 = off. An explicit true / false wins (true: `layers`, or every layer); `auto` turns it on
    when a pass's estimated activations (activation_bytes; `narrowed`: some kept in bf16) exceed `share` of the
    memory available once the model has loaded, for `layers` layers or else the fewest whose checkpointing brings
    the estimate under that share (every layer if none does), and only if checkpointing makes the activations
    smaller."""
    total = num_layers(config) or 1  # a config that names no layer count: "every layer" is all that can be said
    if setting is not None and setting != "auto":
        if not setting:
            return 0, "training.gradient_checkpointing: false"
        of = f", {layers} of {total} layers (training.checkpoint_layers)" if layers and layers < total else ""
        return (min(layers, total) if layers else total), f"training.gradient_checkpointing: true{of}"
    need = activation_bytes(rows, length, config, bytes_per_value, narrowed=narrowed)
    if available is None:
        return 0, f"auto: off (available memory unknown; activations ~{need / 2**30:.1f} GiB a pass)"
    budget = share * available
    n = min(layers, total) if layers else next(
        (k for k in range(1, total + 1)
         if activation_bytes(rows, length, config, bytes_per_value, checkpointed=k, narrowed=narrowed) <= budget),
        total)  # fmt: skip
    saved = activation_bytes(rows, length, config, bytes_per_value, checkpointed=n, narrowed=narrowed)
    on = need > budget and saved < need
    part = f" for {n} of {total} layers" if on and n < total else ""
    return (n if on else 0), (
        f"auto: {'on' if on else 'off'}{part}, activations ~{need / 2**30:.1f} GiB a pass ({rows} rows x {length} "
        f"tokens{', some in bf16' if narrowed else ''}) {'>' if need > budget else '<='} {share:.0%} of the "
        f"{available / 2**30:.1f} GiB available" + (f"; ~{saved / 2**30:.1f} GiB checkpointed" if on else "")
    )


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def checkpoint_write(run_dir: Path, interrupting: bool = False, what: str = "the checkpoint"):
    """Hold Ctrl-C (SIGINT) and SIGTERM while a checkpoint or the result is written, so that it completes.

    The first signal that arrives meanwhile waits for the write: afterwards it is delivered to the handler
    that was in place (the loop stops as on any Ctrl-C), or, when the write is itself the checkpoint of an
    interrupt or the result at the end (`interrupting`), it is already answered. The next one stops at once (SystemExit 130), saying
    which checkpoint is the last complete one; the half-written folder is removed at the next start.
    Off the main thread signals cannot be handled here: the write runs as it is.
    """
    held: list[int] = []

    def hold(signum, frame):
        if held:
            last = ckpt.latest_checkpoint(run_dir)
            left = f"the last complete checkpoint is {last.name} ({last})" if last else "no complete checkpoint"
            log(f"stopped at once while writing: {left}; continue with: tunelab train CONFIG --resume")
            raise SystemExit(130)
        held.append(signum)
        log(f"{signal.Signals(signum).name}: waiting for {what} being written to complete "
            "(once more to stop at once, leaving it incomplete)")  # fmt: skip

    with _signals_to(hold):
        yield
    if held and not interrupting:
        signal.raise_signal(held[0])  # the handler in place now answers it, as if it came just now


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C (SIGINT) and SIGTERM that arrive in the block are delivered when it ends, to the handler in place.

    Around the trackers' calls: a KeyboardInterrupt raised in threading.Condition.notify between a waiter's release and
    its removal (CPython's own code, gh-92530 covers half of it) makes the next notify wake nobody; TensorBoard's writer
    thread then missed the close's stop signal and `tunelab train` hung for the writer's 120 s flush interval after a
    Ctrl-C (seen as a 2-minute stop in tests/test_ui_core.py)."""
    held: list[int] = []
    with _signals_to(lambda signum, frame: held.append(signum)):
        yield
    if held:
        signal.raise_signal(held[0])


@contextlib.contextmanager
def _signals_to(handler):
    """SIGINT and SIGTERM go to `handler` in the block; off the main thread (where Python cannot set one) unchanged."""
    if not on_main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
