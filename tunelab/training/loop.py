"""The one training loop. Read it top to bottom: load, apply the method, build data, train, save.

Deliberately a plain function, not a Trainer class: every step is visible here, and a stage
(sft, pretrain, reward, dpo ...) is a loss and a batch shape on this same loop (stages/base.py).

It is plain PyTorch + PEFT. The CPU speed code lives in tunelab/accel and plugs in at the lines marked
`speed.` / `accel.` (docs/performance.md); with `training.accelerate: off` each of those is a no-op.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

import torch
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from tunelab import accel
from tunelab.bf16_table import measured_bf16
from tunelab.config import ConfigError
from tunelab.data import DataError
from tunelab.data.collate import STAND_IN, real_tokens
from tunelab.methods import check_model, reference
from tunelab.methods import get as get_method
from tunelab.models import count_parameters, resolve_device
from tunelab.models.loading import hub_commit, loading_into, unwrap
from tunelab.models.precision import choose_precision
from tunelab.stages import Stage
from tunelab.stages import get as get_stage
from tunelab.training import checkpoint as ckpt
from tunelab.training import distributed
from tunelab.training.harness import (
    MetricsLog,
    RunResult,
    autocast_for,
    available_memory,
    batch_order,
    checkpoint_write,
    checkpointing_choice,
    early_stop,
    fp32_master_weights_,
    log,
    master_weights_plan,
    narrowable,
    no_autocast,
    num_layers,
    on_main_thread,
    optimizer_for,
    optimizer_state_choice,
    progress_bar,
    raise_keyboard_interrupt,
    resolved_dtype,
    save_result,
    saved_activations_choice,
    scheduler_for,
    start_run,
    timed,
    to_device,
    write_results_json,
)


@torch.no_grad()
def evaluate_loss(model, batches: list[dict], device, autocast, stage: Stage, extras: dict | None = None) -> float:
    """Mean loss over every loss term (label token, or row) of the validation set; `extras`, when given,
    receives the mean of each extra metric the stage's loss_sum returns."""
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    for batch in batches:
        with autocast():
            loss_sum, n, *more = stage.loss_sum(model, to_device(batch, device))
        total += float(loss_sum)
        count += n
        for k, v in (more[0] if more else {}).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    if extras is not None:
        extras.update({k: v / max(count, 1) for k, v in sums.items()})
    return total / max(count, 1)


def evaluate(step: int, model, val_batches, stage: Stage, dist, device, autocast, metrics_log) -> float | None:
    """The validation loss at `step` (None without validation rows), written to the metrics log."""
    if not val_batches:
        return None
    extras: dict = {}
    if dist.multi:  # each process scores a share of the batches; sums are added over processes
        loss = dist.evaluate_loss(model, val_batches, autocast, to_device, extras)
    else:
        loss = evaluate_loss(model, val_batches, device, autocast, stage, extras)
    metrics_log.write({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in extras.items()}})
    return loss


def train(
    cfg,
    resume: bool = False,
    callbacks: list[Callable[[int, dict], None]] | None = None,
    force: bool = False,
    eval_before: dict | None = None,
) -> RunResult:
    """Run one fine-tuning job described by a validated Config. See docs/getting-started.md.

    `eval_before`: the step-0 evaluation record ({"eval_loss": ..., and any eval_* extras}) when the caller
    already has it from a run that starts from the very same model on the same validation rows (the
    learning rates of a compare sweep: compare/cell.py); it is logged as if computed, and not computed."""
    phases: dict = {}  # RunResult.phases: where the run's time went
    t_load = time.perf_counter()
    stage = get_stage(cfg.stage, cfg)
    if stage.loop == "ppo":  # RLHF samples its own data each iteration: a loop of its own (training/ppo.py)
        if distributed.world_size() > 1:
            raise ConfigError("stage ppo trains in one process (its rollouts are not sharded): drop --nproc / torchrun")
        from tunelab.training.ppo import train_ppo

        return train_ppo(cfg, resume=resume, callbacks=callbacks, force=force)
    tcfg = cfg.training
    if stage.check_data is not None:  # a bad data file is reported now, not after the model has loaded
        stage.check_data(cfg)
    check_model(cfg, log)  # likewise a model the method cannot take
    accel.check(tcfg, resolve_device(tcfg.device), distributed.world_size() > 1)  # settings the device refuses
    run_dir, resume_from = start_run(cfg, resume, force)

    # ---- model and method
    device = resolve_device(tcfg.device)
    dist = distributed.Dist(device, tcfg)  # one process: plain steps; several: DDP (distributed.py)
    device = dist.device
    speed = accel.start(tcfg, device)  # accel: the allocator's settings, before the model loads
    method = get_method(cfg.method.name)
    # whether this run's bf16 is measured faster on a CPU at the same loss (bf16_table.MEASURED_BF16)
    measured = measured_bf16(cfg.method.name, cfg.stage, speed.on, tcfg.master_weights)
    precision = choose_precision(cfg.model.dtype, device, measured=measured, run=f"{cfg.method.name} on {cfg.stage}")
    # this run's loads and passes take `auto` as resolved for it (bf16 on a CPU with native bf16 where MEASURED_BF16
    # says so); the result keeps `auto`, for whatever host loads it next
    loaded = resolved_dtype(cfg, precision)
    # qlora: the base read straight into 4-bit; lora (accel): its frozen linears straight into their compact form
    with loading_into(method.load_plan(cfg.method, device) or speed.load_plan(loaded, dist.multi)):
        model, tokenizer = stage.load_model(loaded, device)
    base_commit = hub_commit(cfg.model)  # a hub id: the commit its revision resolved to, pinned in the result
    if base_commit:
        log(f"model {cfg.model.name} at commit {base_commit} (revision {cfg.model.revision or 'main'}): the result "
            "pins it")  # fmt: skip
    dist.check(cfg, method, resume)
    model = method.apply(model, cfg.method)
    learning = method.optimizer_parameters(model, cfg.method)  # gradual unfreezing: those that thaw later too
    autocast = autocast_for(device, loaded.model.dtype)
    # bf16 runs: the weights that train kept in fp32 (mixed precision) or in bf16 with stochastic rounding; the
    # memory left once their gradients and AdamW's moments exist
    own = method.CAPABILITIES.reference == "frozen_copy"  # the model's own weights train, not an adapter beside them
    setting = tcfg.master_weights
    if resume_from is not None and setting == "auto":  # as the run started, whatever this host's or version's auto
        setting = ckpt.saved_master_weights(resume_from) or setting
    # fp32 weights that train: their gradients and AdamW's moments in bf16 (training.optimizer_state)
    bf16_state, why_state = optimizer_state_choice(tcfg.optimizer_state, device, learning, count_parameters(model)[1],
                                                   own, dist.multi, available_memory())  # fmt: skip
    bf16_weights, why_weights, available = master_weights_plan(setting, device, model, learning,
                                                               autocast is not no_autocast, own, bf16_state)  # fmt: skip
    if setting != tcfg.master_weights and why_weights:
        why_weights = f"auto, as the run started: {resume_from.name}'s weights are {setting}"
    # the rows one forward pass holds (thread shares split them, not add to them), at the data's length
    rows = min(tcfg.rows_per_pass or tcfg.batch_size, tcfg.batch_size)
    width = torch.finfo(precision.dtype).bits // 8
    # activations the backward pass reads kept in bf16 (training.saved_activations): auto, where the run keeps its
    # gradients so already, or where memory would otherwise need recomputation (they cost none: tried first)
    narrows = narrowable(tcfg, model, width)
    keep, why_keep = saved_activations_choice(tcfg.saved_activations, bf16_state, rows, cfg.data.max_length,
                                              unwrap(model).config, available, narrows)  # fmt: skip
    if why_keep:
        log(f"saved activations: {why_keep}")
    checkpointing, why = checkpointing_choice(tcfg.gradient_checkpointing, rows, cfg.data.max_length,
                                              unwrap(model).config, width, available,
                                              layers=tcfg.checkpoint_layers, narrowed=keep and narrows)  # fmt: skip
    auto = tcfg.gradient_checkpointing == "auto"
    if checkpointing and auto and not getattr(unwrap(model), "supports_gradient_checkpointing", False):
        checkpointing, why = False, f"{why}, but {type(unwrap(model)).__name__} does not support it: off"
    if checkpointing and auto and method.CAPABILITIES.virtual_tokens == "past_key_values":
        checkpointing, why = (
            False,
            f"{why}, but transformers' checkpointed layers drop method {cfg.method.name}'s KV cache: off",
        )
    if checkpointing:
        layers = num_layers(unwrap(model).config)
        done = enable_gradient_checkpointing(model, checkpointing / max(1, layers))
        if checkpointing < layers and (done is None or done[1] != layers):  # say what ran where it differs
            why += f"; recomputed: {f'{done[0]} of {done[1]} blocks' if done else 'every block (none is per layer)'}"
    log(f"gradient checkpointing: {why}")
    for note in stage.notes(cfg) if stage.notes is not None else []:  # e.g. dpo: SimPO at DPO's beta
        log(f"note: {note}")
    if stage.prepare is not None:  # e.g. dpo: a frozen reference copy of the starting model
        stage.prepare(model, cfg)
    if bf16_weights:
        precision = precision.with_bf16_weights()
    log(f"precision: {precision.name} ({precision.reason})")
    if bf16_weights:
        log(f"bf16 weights: {sum(p.numel() for p in learning):,} trainable parameters, their gradients and AdamW moments stay bf16, every "
            f"update rounded stochastically ({why_weights}; training.master_weights: fp32 keeps fp32 copies)")  # fmt: skip
    elif autocast is not no_autocast and (upcast := fp32_master_weights_(model, learning)):
        log(
            f"mixed precision: bf16 autocast, {upcast:,} trainable parameters kept in fp32"
            + (f" ({why_weights})" if why_weights else "")
        )
    if bf16_state:
        log(f"optimizer state: the gradients and AdamW moments of {sum(p.numel() for p in learning):,} fp32 weights kept "
            f"in bf16, the moments rounded stochastically ({why_state}; training.optimizer_state: fp32 keeps them in "
            "fp32)")  # fmt: skip
    elif why_state:
        log(f"optimizer state: fp32 ({why_state})")
    trainable, total = count_parameters(model)
    total += speed.compact_parameters  # weights held compact since loading are no parameters
    start = cfg.method.starts_from  # lora's start_from: an existing adapter trained on
    log(f"method {cfg.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        + (f", starting from {start}" if start else ""))  # fmt: skip
    neftune = None
    if (
        tcfg.neftune_alpha is not None
    ):  # noisy embeddings in training passes: transformers' own hook, removed at the end
        neftune = activate_neftune(model, tcfg.neftune_alpha)
        log(
            f"NEFTune: uniform noise alpha / sqrt(width x hidden) on the input embeddings, alpha {tcfg.neftune_alpha:g}"
        )
    # accel: fast LoRA, fused RMSNorm, packed attention, fused head loss, compact frozen weights, thread shares
    speed.prepare(model, loaded, total, dist.multi, autocast=autocast is not no_autocast,
                  keep=torch.bfloat16 if keep else None, ahead=stage.ahead is not None)  # fmt: skip
    # accel: a frozen reference copy (dpo, kto) computes as the policy does, its weights compact
    speed.match(reference.frozen(model), loaded, dist.multi)
    if autocast is not no_autocast and not speed.autocast:  # accel: bf16 passes that run in bf16 by themselves
        autocast, precision = no_autocast, precision.without_autocast()
        log(f"precision: {precision.name}: the passes run in bf16 without autocast (tunelab/accel)")
    for line in speed.describe().splitlines():  # the pieces on, then one line per piece not on: why, what turns it on
        log(line)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    phases["load"] = time.perf_counter() - t_load

    # ---- data
    with timed(phases, "data"):
        data = stage.build_data(cfg, tokenizer)
        if not data.train:
            raise DataError("no training examples left after tokenisation")
        log("data: " + ", ".join(f"{k}={v}" for k, v in data.stats.items()))
        pad_id = tokenizer.pad_token_id
        # only the batches evaluated are collated: a large set's examples are read from disk (the data store)
        n_val = len(data.val) if tcfg.eval_batches is None else min(len(data.val), tcfg.eval_batches * tcfg.batch_size)
        with speed.collating(precision.dtype):  # accel: bf16 on a CPU rounds the widths up (accel/memory.py)
            val_batches = [stage.collate(data.val[j : j + tcfg.batch_size], pad_id)
                           for j in range(0, n_val, tcfg.batch_size)]  # fmt: skip
    t_load = time.perf_counter()

    # N processes x batch b see the batches of one process with batch N*b, each process a slice of each
    global_batch = tcfg.batch_size * dist.world_size
    batches_per_epoch = math.ceil(len(data.train) / global_batch)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * batches_per_epoch / tcfg.grad_accum))
    steps_per_epoch = math.ceil(batches_per_epoch / tcfg.grad_accum)
    # evaluations and checkpoints every N steps, or N times an epoch (evals_per_epoch, saves_per_epoch: Axolotl's)
    eval_every = tcfg.eval_every or (max(1, steps_per_epoch // tcfg.evals_per_epoch) if tcfg.evals_per_epoch else None)
    save_every = tcfg.save_every or (max(1, steps_per_epoch // tcfg.saves_per_epoch) if tcfg.saves_per_epoch else None)

    # ---- optimisation
    params = method.optimizer_parameters(model, cfg.method)  # default: those with requires_grad now
    scales = method.lr_scales(model, cfg.method)  # parameters at a learning rate of their own (LoRA+'s B)
    optimizer = method.optimizer(params, tcfg, lr_scales=scales)
    if optimizer is None:  # the method's own optimizer (qlora: paged 8-bit AdamW on CUDA), else AdamW
        optimizer = optimizer_for(params, tcfg, scales, bf16_state)
    if scales:
        log(f"learning rates: {len(scales):,} tensors at {sorted(set(scales.values()))} x training.lr")
    scheduler = scheduler_for(optimizer, tcfg, total_steps)
    if hasattr(optimizer, "how"):  # bf16 weights: which form of the stochastic-rounding step runs
        log(f"bf16 AdamW step: {optimizer.how}")
    log(
        f"effective batch {global_batch * tcfg.grad_accum} = {tcfg.batch_size} per micro-batch x "
        f"{tcfg.grad_accum} accumulated x {dist.world_size} process(es)"
        + (f", {tcfg.rows_per_pass} row(s) per forward pass" if tcfg.rows_per_pass else "")
        + (f" ({dist.describe()})" if dist.multi else "")
    )

    state = {"step": 0, "best_eval": None, "evals_without_improvement": 0, "tokens": 0, "eval_loss_before": None}
    state["global_batch"] = global_batch  # a resume must see the same data order
    if resume_from is not None:
        saved = dist.load_checkpoint(resume_from, model, optimizer, scheduler, global_batch)
        state.update(saved)
        log(f"resumed from {resume_from} at step {state['step']}/{total_steps}")
        if speed.masks and saved.get("dropout_masks", speed.masks) != speed.masks:  # a C compiler gone or come
            log(f"LoRA dropout masks: the run so far drew them by {saved['dropout_masks']}, this process draws them by "
                f"{speed.masks}: the steps from here draw other masks than an uninterrupted run would (the same "
                "distribution)")  # fmt: skip
    state["dropout_masks"] = speed.masks  # kept in each checkpoint's loop state
    optimizer = dist.prepare(model, stage, optimizer)  # wraps the model in DDP when there are several processes
    metrics_log = MetricsLog(run_dir, cfg, state["step"]) if dist.is_main else distributed.NullLog()
    samples_log = MetricsLog(run_dir, None, state["step"], "samples.jsonl") if stage.samples and dist.is_main else None

    def write_samples(step: int) -> None:
        """Generations at an evaluation (stage.samples: pre-training), to samples.jsonl and the log."""
        if samples_log is None:
            return
        with autocast():
            records = stage.samples(model, tokenizer, cfg, data, step)
        for r in records:
            samples_log.write(r)
            log(f"sample at step {step} (temperature {r['temperature']:g}): {r['prompt'] + r['text']!r}")

    phases["load"] += time.perf_counter() - t_load
    with timed(phases, "eval"):
        if state["step"] == 0 and val_batches and eval_before is not None:
            metrics_log.write({"step": 0, **eval_before})
            state["eval_loss_before"] = eval_before["eval_loss"]
            log(f"eval loss before training: {state['eval_loss_before']:.4f} (that of the same starting model)")
        elif state["step"] == 0 and val_batches:
            state["eval_loss_before"] = evaluate(0, model, val_batches, stage, dist, device, autocast, metrics_log)
            log(f"eval loss before training: {state['eval_loss_before']:.4f}")
        if state["step"] == 0:
            write_samples(0)

    progress = progress_bar(tcfg.progress and dist.is_main, total_steps, state["step"])
    model.train()
    interrupted = stop_early = False
    step_start = None
    last_loss = float("nan")
    t_start, tokens_start = time.perf_counter(), state["tokens"]
    aside = phases.get("eval", 0.0) + phases.get("save", 0.0)  # evals and checkpoints inside the loop are not training
    order, order_epoch = [], None  # the micro-batches of the current epoch (batch_order)
    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt) if on_main_thread() else None
    try:
        while state["step"] < total_steps and not stop_early:
            step = state["step"]
            # snapshot so that an interrupt mid-step checkpoints the state *before* this step
            step_start = (dict(state), ckpt.rng_state())
            if method.CAPABILITIES.changes_trainables:
                note = method.on_step(model, cfg.method, step, steps_per_epoch=steps_per_epoch)
                if note:
                    log(f"step {step}: {note}")
                    metrics_log.write({"step": step, "event": note})
                dist.refresh()  # DDP must be rebuilt when the set of trainable parameters changed
            # this process's slice of each micro-batch of the step: (examples, weight); weight 0 marks a stand-in row
            micro = []
            for k in range(tcfg.grad_accum):
                epoch, index = divmod(step * tcfg.grad_accum + k, batches_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = batch_order(len(data.train), global_batch, tcfg.seed, epoch), epoch
                rows, weight = dist.shard(order[index])
                micro.append(([data.train[i] for i in rows], weight))
            if speed.shares > 1:  # accel: each micro-batch's rows as shares at once, a thread each (accel/threads.py)
                with speed.collating(precision.dtype):
                    n_label, done = accel.sharded_step(
                        micro, speed.shares, tcfg.rows_per_pass, stage, pad_id, dist.loss_sum, model
                    )
            else:
                # forward passes of `rows_per_pass` rows (null: the whole micro-batch): (batch, weight, tokens)
                passes = []
                with speed.collating(precision.dtype):
                    for examples, weight in micro:
                        size = tcfg.rows_per_pass or len(examples)
                        for j in range(0, len(examples), size):
                            batch = stage.collate(examples[j : j + size], pad_id)
                            if weight == 0:  # a stand-in: its rows count in no statistic across processes
                                batch[STAND_IN] = True
                            passes.append((batch, weight, real_tokens(examples[j : j + size], batch)))
                # the label terms of the whole step, summed over processes: one normaliser for the global batch
                n_label = int(dist.sum(sum(w * stage.count(b) for b, w, _ in passes))[0])
                done = []  # (summed loss, extra metrics, weight, tokens) per pass
                for j, (batch, weight, tokens) in enumerate(passes):
                    with dist.no_sync(j < len(passes) - 1):  # several processes: all-reduce on the last pass
                        with autocast(), speed.forward():  # accel: norm outputs rebuilt in the backward pass
                            loss_sum, _, *more = dist.loss_sum(to_device(batch, device))
                        dist.backward(loss_sum * weight / max(n_label, 1))
                    done.append((float(loss_sum.detach()), more[0] if more else {}, weight, tokens))
            loss_total = sum(w * loss for loss, _, w, _ in done)
            step_tokens = sum(w * tokens for _, _, w, tokens in done)
            extra_sums: dict[str, float] = {}
            for _, more, w, _ in done:  # extra metrics, e.g. dpo's reward accuracy
                for k, v in more.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + w * float(v)
            loss_total, step_tokens, *extras = dist.sum(loss_total, step_tokens, *extra_sums.values())
            extra_sums = dict(zip(extra_sums, extras))
            state["tokens"] += int(step_tokens)
            grad_norm = dist.clip_grad_norm_(params, tcfg.max_grad_norm, optimizer) if tcfg.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            speed.step_done()  # accel: the allocator's cached blocks handed back (accel/memory.py)
            state["step"] = step = step + 1
            last_loss = loss_total / max(n_label, 1)
            elapsed = time.perf_counter() - t_start
            tok_s = (state["tokens"] - tokens_start) / max(elapsed, 1e-9)
            record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s}
            record.update({k: v / max(n_label, 1) for k, v in extra_sums.items()})
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if step % tcfg.log_every == 0 or step == total_steps:
                metrics_log.write(record)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
            progress.update(1)

            if eval_every and step % eval_every == 0 and step < total_steps:
                with timed(phases, "eval"):
                    eval_loss = evaluate(step, model, val_batches, stage, dist, device, autocast, metrics_log)
                    record["eval_loss"] = eval_loss
                    write_samples(step)
                stop_early = early_stop(state, eval_loss, tcfg.early_stopping_patience)
                if stop_early:
                    log(
                        f"early stopping at step {step}: no eval-loss improvement in {tcfg.early_stopping_patience} evals"
                    )
            if save_every and step % save_every == 0 and step < total_steps:
                with (
                    timed(phases, "save"),
                    checkpoint_write(run_dir),
                ):  # a Ctrl-C meanwhile waits for the checkpoint, then stops the run
                    dist.save_checkpoint(run_dir, model, optimizer, scheduler, state, keep=tcfg.keep_checkpoints)
            for cb in callbacks or []:
                cb(step, record)
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
        if step_start is not None and step_start[0]["step"] == state["step"]:  # mid-step: roll back
            state = step_start[0]
        rng = step_start[1] if step_start is not None and step_start[0]["step"] == state["step"] else None
        # several processes: rank 0 alone writes (the others may already be gone), see distributed.py.
        # A second Ctrl-C / SIGTERM waits for this checkpoint; a third stops at once (harness.checkpoint_write).
        with timed(phases, "save"), checkpoint_write(run_dir, interrupting=True):
            path = dist.save_checkpoint(
                run_dir, model, optimizer, scheduler, state, keep=tcfg.keep_checkpoints, rng=rng, together=False
            )
        log(f"interrupted: checkpoint written to {path}; continue with: tunelab train CONFIG --resume")
    finally:
        progress.close()
        # accel: threads and buffers freed; task metrics may generate: compact weights decoded once, not per token
        speed.release(model, expand=stage.final_metrics is not None)
        if hasattr(optimizer, "remove_hooks"):  # bf16 optimizer state: no gradient collected after the run
            optimizer.remove_hooks()
        if neftune is not None:  # the model leaves the loop as it came in: no hook on what is saved or scored next
            deactivate_neftune(model, neftune)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        aside = phases.get("eval", 0.0) + phases.get("save", 0.0) - aside
        phases["train"] = time.perf_counter() - t_start - aside

    metrics = {
        "steps": state["step"],
        "train_loss": last_loss,
        "trainable_params": trainable,
        "total_params": total,
        "tokens": state["tokens"],
        "tokens_per_s": (state["tokens"] - tokens_start) / max(time.perf_counter() - t_start, 1e-9),
        "eval_loss_before": state["eval_loss_before"],
        "processes": dist.world_size,
        "precision": precision.name,
        "optimizer_state": "bf16" if bf16_state or bf16_weights else "fp32",  # gradients and AdamW moments
        "saved_activations": speed.kept,  # narrower than the passes (training.saved_activations), or None
        "effective_batch_size": global_batch * tcfg.grad_accum,
        **{f"data_{k}": v for k, v in data.stats.items()},
    }
    if base_commit:
        metrics["base_commit"] = base_commit
    if interrupted:
        metrics_log.close()
        dist.close()
        return RunResult(run_dir, None, {**metrics, "interrupted": True}, phases)

    with timed(phases, "eval"):
        metrics["eval_loss"] = evaluate(state["step"], model, val_batches, stage, dist, device, autocast, metrics_log)
        if metrics["eval_loss"] is not None:
            log(f"eval loss after training: {metrics['eval_loss']:.4f}")
        if not dist.sharded:
            write_samples(state["step"])
    if dist.sharded:  # FSDP / DeepSpeed: gather the shards into one model on rank 0 (every process takes part)
        model = dist.gathered_model(cfg, stage, method)
    if not dist.is_main:  # rank 0 scores and writes the result
        dist.close()
        return RunResult(run_dir, None, metrics, phases)
    if dist.sharded:
        log("task metrics are not computed under FSDP / DeepSpeed: score final/ with `tunelab eval`")
    elif stage.final_metrics is not None:
        with timed(phases, "score"), autocast():  # as in training: fp32 master weights beside bf16 frozen ones
            task_scores = stage.final_metrics(model, tokenizer, cfg, data, device)
        metrics.update(task_scores)
        if task_scores:
            metrics_log.write({"step": state["step"], **task_scores}, section="dev")
            log("dev metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in task_scores.items()))
    metrics_log.close()
    with timed(phases, "save"):
        manifest = stage.manifest(cfg) if stage.manifest else {}
        if base_commit:  # stages/runs.load_run reloads the base at this commit
            manifest["base_commit"] = base_commit
        final_dir = save_result(run_dir, model, tokenizer, method.save, cfg, manifest, metrics)
        write_results_json(run_dir, metrics)
    log(f"result written to {final_dir}")
    dist.close()
    return RunResult(run_dir, final_dir, metrics, phases)


def enable_gradient_checkpointing(model, share: float = 1.0) -> tuple[int, int] | None:
    """Transformers' per-layer checkpointing, non-reentrant: it needs no input that requires grad, so
    frozen embeddings (LoRA, prompt methods) need no `enable_input_require_grads` workaround. `share` < 1: only the
    first that share of the model's blocks recompute (selective checkpointing, as torchtune's and Megatron's); the
    first, since the backward pass reaches them last, when the later blocks' activations are freed. Returns
    (blocks checkpointed, blocks), or None for a model whose blocks are not transformers' checkpointable layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"training.gradient_checkpointing: {type(inner).__name__} does not support it; set it to false"
        )
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        return None
    n = max(1, min(len(blocks), round(share * len(blocks))))
    for block in blocks[n:]:
        block.gradient_checkpointing = False
    return n, len(blocks)
