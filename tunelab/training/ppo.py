"""RLHF with PPO (stage: ppo): maximise E[R(x, y) - beta * log(pi(y|x) / pi_ref(y|x))] over sampled responses.

Why a loop of our own: TRL removed its PPOTrainer in 2026 and no other maintained library runs PPO on a
Hugging Face causal LM with a PEFT adapter, so this module is tunelab's maintained, readable PPO-RLHF.
It follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Ouyang et al.
2022 (InstructGPT), with the details of Huang et al. 2024 ("The N+ Implementation Details of RLHF with
PPO"). It reuses the harness: the method registry, RunResult, the metrics log, atomic checkpoints and
the final/ folder of training/loop.py and training/checkpoint.py.

One iteration (= one training step; training.max_steps counts iterations):
  1. rollout   sample a response y for each of `rollout_batch_size` prompts x from the policy pi
  2. score     R(x, y): a reward-model run, or a builtin toy reward
  3. evaluate  per-token log pi, log pi_ref (the same model with the adapter switched off) and values V
  4. rewards   r_t = -beta * (log pi - log pi_ref)_t, plus R(x, y) on the last response token
  5. GAE       advantages A_t and returns A_t + V_t (Schulman et al. 2016)
  6. optimise  ppo_epochs passes over mini-batches: clipped surrogate + vf_coef * clipped value loss
               (- entropy_coef * entropy)
  7. KL        adapt beta towards kl_target (Ziegler et al. 2019); log; checkpoint

The policy is the causal LM with the method's trainable part (LoRA by default) plus a value head (one
linear layer on the last hidden state) that trains with it. The reference pi_ref is the starting (SFT)
policy, as the method declares it (tunelab/methods/reference.py, shared with DPO): for PEFT adapter methods
the same weights with the adapter disabled, so there is no second copy in memory; for weight-training
methods (full, freeze, ...) a frozen copy.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from tunelab.accel import fast_lora
from tunelab.methods import check_model, reference
from tunelab.methods import get as get_method
from tunelab.models import count_parameters, resolve_device
from tunelab.models.generation import generate
from tunelab.stages.ppo import PolicyWithValue, RewardFn, load_policy, load_prompts, reward_function
from tunelab.training import checkpoint as ckpt
from tunelab.training.harness import (
    MetricsLog,
    RunResult,
    autocast_for,
    batch_order,
    checkpoint_write,
    fp32_master_weights_,
    log,
    no_autocast,
    on_main_thread,
    optimizer_for,
    progress_bar,
    save_result,
    scheduler_for,
    start_run,
    write_results_json,
)
from tunelab.training.ppo_math import (
    entropy_of,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    ppo_losses,
    token_logprobs,
    update_kl_coef,
)


def response_forward(lm, seq: torch.Tensor, mask: torch.Tensor, n_resp: int, temperature: float, hidden: bool):
    """Logits (divided by the sampling temperature) that predict the last n_resp tokens of `seq`, and the
    last hidden states at the same positions (for the value head) when `hidden`.

    Position ids come from the attention mask, as in `generate`, so left-padded prompts see the same
    positions here as when the response was sampled. Only the response positions get logits
    (`logits_to_keep`): the vocabulary projection over the prompt would be wasted work."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(
        input_ids=seq,
        attention_mask=mask,
        position_ids=pos,
        logits_to_keep=n_resp + 1,
        output_hidden_states=hidden,
        use_cache=False,
    )
    logits = out.logits[:, -n_resp - 1 : -1].float() / temperature
    h = out.hidden_states[-1][:, -n_resp - 1 : -1] if hidden else None
    return logits, h


# --------------------------------------------------------------------------------------- rollouts
@torch.no_grad()
def sample_responses(lm, prompt_ids: list[list[int]], tokenizer, max_new_tokens: int, temperature: float,
                     top_k: int, device) -> dict:  # fmt: skip
    """Left-padded prompts plus sampled (temperature 0: greedy) responses, cut after the first end-of-turn.

    Returns seq [B, P+T], mask [B, P+T] (prompt and response tokens up to and including the first eos),
    response [B, T] and response_mask [B, T]."""
    # The sampling settings go to generate explicitly: the model's own defaults (top_k=50, top_p, ...) would
    # sample from a different distribution than the one whose log-probs PPO computes.
    gen = generate(lm, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=1.0, use_cache=True, device=device)  # fmt: skip
    pad, eos = gen.pad_token_id, tokenizer.eos_token_id
    ids, pmask, response = gen.prompt_ids, gen.prompt_mask, gen.tokens
    is_eos = response == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    response = response.masked_fill(after_eos, pad)
    seq = torch.cat([ids, response], 1)
    return {"seq": seq, "mask": torch.cat([pmask, response_mask], 1), "response": response,
            "response_mask": response_mask}  # fmt: skip


@torch.no_grad()
def score_rollout(policy: PolicyWithValue, roll: dict, temperature: float, mini_batch: int, autocast):
    """log pi, log pi_ref, values, entropy and exact KL(pi || pi_ref) of the next-token distributions at
    every response position, mini-batch by mini-batch. pi_ref is `reference.policy(policy.lm)`."""
    n = roll["response"].shape[1]
    parts: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": [], "kl": []}
    for i in range(0, len(roll["seq"]), mini_batch):
        seq, mask, resp = (roll[k][i : i + mini_batch] for k in ("seq", "mask", "response"))
        with autocast():
            logits, hidden = response_forward(policy.lm, seq, mask, n, temperature, hidden=True)
            with reference.policy(policy.lm) as ref:
                ref_logits, _ = response_forward(ref, seq, mask, n, temperature, hidden=False)
        parts["logprobs"].append(token_logprobs(logits, resp))
        parts["ref_logprobs"].append(token_logprobs(ref_logits, resp))
        parts["values"].append(policy.value_head(hidden.float()).squeeze(-1))
        parts["entropy"].append(entropy_of(logits))
        logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        parts["kl"].append((logp.exp() * (logp - ref_logp)).sum(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def rollout(policy, prompts: list[dict], tokenizer, reward_fn: RewardFn, pcfg, temperature: float,
            device, autocast) -> dict:  # fmt: skip
    """Sample, score with R and with the models: everything PPO needs for one batch of prompts."""
    roll = sample_responses(
        policy.lm, [p["ids"] for p in prompts], tokenizer, pcfg.max_new_tokens, temperature, pcfg.top_k, device
    )
    texts = tokenizer.batch_decode(roll["response"], skip_special_tokens=True)
    roll["texts"] = [t.strip() for t in texts]
    eos = tokenizer.eos_token_id
    ids = [[t for t, m in zip(r, k) if m and t != eos] for r, k in zip(roll["response"].tolist(),
                                                                     roll["response_mask"].tolist())]  # fmt: skip
    roll["scores"] = reward_fn([p["messages"] for p in prompts], roll["texts"], ids).float().to(device)
    # greedy responses (temperature 0) are scored at temperature 1
    scale = temperature if temperature > 0 else 1.0
    roll.update(score_rollout(policy, roll, scale, pcfg.mini_batch_size, autocast))
    return roll


# ------------------------------------------------------------------------------------ one iteration
def ppo_update(policy, roll: dict, kl_coef: float, pcfg, optimizer, scheduler, params, tcfg, autocast,
               generator: torch.Generator) -> dict:  # fmt: skip
    """Steps 4-6: KL-penalised rewards, GAE, then ppo_epochs of clipped updates. Returns mean statistics."""
    mask = roll["response_mask"].float()
    rewards, log_ratio = kl_penalised_rewards(roll["scores"], roll["logprobs"], roll["ref_logprobs"], mask, kl_coef)
    advantages, returns = gae(rewards, roll["values"], mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    data = {"seq": roll["seq"], "mask": roll["mask"], "response": roll["response"], "response_mask": mask,
            "logprobs": roll["logprobs"], "values": roll["values"] * mask, "advantages": advantages,
            "returns": returns}  # fmt: skip
    n, n_resp = len(data["seq"]), data["response"].shape[1]
    stats: list[dict] = []
    for _ in range(pcfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, pcfg.mini_batch_size):
            idx = order[i : i + pcfg.mini_batch_size].to(data["seq"].device)
            mb = {k: v[idx] for k, v in data.items()}
            with autocast():
                logits, hidden = response_forward(policy.lm, mb["seq"], mb["mask"], n_resp, pcfg.temperature, True)
            new_logprobs = token_logprobs(logits, mb["response"])
            new_values = policy.value_head(hidden.float()).squeeze(-1)
            loss, st = ppo_losses(new_logprobs, new_values, entropy_of(logits),
                                  {**mb, "mask": mb["response_mask"]}, pcfg)  # fmt: skip
            loss.backward()
            if tcfg.max_grad_norm:
                st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.append(st)
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    seq_kl = log_ratio.sum(1)
    out.update({
        "score": float(roll["scores"].mean()),
        "kl": float(seq_kl.mean()),
        "kl_exact": float((roll["kl"] * mask).sum(1).mean()),
        "non_score_reward": float((-kl_coef * seq_kl).mean()),
        "entropy": float(masked_mean(roll["entropy"], mask)),
        "response_length": float(mask.sum(1).mean()),
        "return_mean": float(masked_mean(returns, mask)),
    })  # fmt: skip
    return out


@torch.no_grad()
def evaluate_prompts(policy, prompts: list[dict], tokenizer, reward_fn, pcfg, seed: int, device, autocast):
    """Mean R and KL to pi_ref on held-out prompts, sampled with a fixed seed (or greedy) so runs and
    checkpoints compare like for like; the global RNG is left untouched (exact resume).

    eval_kl sums the exact KL of the next-token distributions over the response positions, so it is
    a KL for greedy responses too (a sampled log-ratio estimates KL only for sampled responses)."""
    temperature = pcfg.temperature if pcfg.eval_temperature is None else pcfg.eval_temperature
    scores, kls, lengths, samples = [], [], [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), pcfg.rollout_batch_size):
            batch = prompts[i : i + pcfg.rollout_batch_size]
            roll = rollout(policy, batch, tokenizer, reward_fn, pcfg, temperature, device, autocast)
            mask = roll["response_mask"].float()
            scores += roll["scores"].tolist()
            kls += (roll["kl"] * mask).sum(1).tolist()
            lengths += mask.sum(1).tolist()
            samples += [{"prompt": p["messages"][-1]["content"], "response": t, "score": s}
                        for p, t, s in zip(batch, roll["texts"], roll["scores"].tolist())]  # fmt: skip
    n = len(scores)
    metrics = {"eval_score": sum(scores) / n, "eval_kl": sum(kls) / n, "eval_response_length": sum(lengths) / n}
    return metrics, samples


# --------------------------------------------------------------------------------------- the run
def train_ppo(
    cfg, resume: bool = False, callbacks=None, reward_fn: RewardFn | None = None, force: bool = False
) -> RunResult:
    """Run stage ppo from a validated Config (see docs/alignment.md). `reward_fn` overrides ppo.reward."""
    tcfg, pcfg = cfg.training, cfg.ppo
    check_model(cfg, log)  # before the model loads, as the loop does
    run_dir, resume_from = start_run(cfg, resume, force)

    # ---- policy, reference, value head
    device = resolve_device(tcfg.device)
    lm, tokenizer, base_model_cfg, manifest_extra = load_policy(cfg, device)
    method = get_method(cfg.method.name)
    lm = method.apply(lm, cfg.method)
    reference.prepare(lm, method)  # pi_ref: the adapter switched off, or a frozen copy taken now (before a resume)
    if tcfg.accelerate == "auto" and fast_lora.routes(lm):  # accel: LoRA layers as one folded matmul (fast_lora.py)
        fast_lora.enable(lm)
    policy = PolicyWithValue(lm, lm.config.hidden_size).to(device)
    autocast = autocast_for(device, cfg.model.dtype)
    if autocast is not no_autocast:
        fp32_master_weights_(policy)
    # Dropout stays off (eval mode) throughout: the rollout's log-probs must equal the update's
    # log-probs before the first step, or the PPO ratio starts away from 1 and is clipped at random.
    policy.eval()
    trainable, total = count_parameters(policy)
    log(f"method {cfg.method.name}: {trainable:,} trainable of {total:,} parameters (value head included)")
    reward_fn = reward_fn or reward_function(pcfg.reward, tokenizer, device, cfg.model.trust_remote_code)

    # ---- prompts and schedule
    train_prompts, eval_prompts, stats = load_prompts(pcfg, tokenizer, tcfg.seed)
    log("prompts: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    per_epoch = math.ceil(len(train_prompts) / pcfg.rollout_batch_size)
    total_iters = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * per_epoch))
    updates_per_iter = pcfg.ppo_epochs * math.ceil(pcfg.rollout_batch_size / pcfg.mini_batch_size)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = optimizer_for(params, tcfg, method.lr_scales(lm, cfg.method))  # LoRA+: B at its own rate
    scheduler = scheduler_for(optimizer, tcfg, total_iters * updates_per_iter)

    state = {"step": 0, "kl_coef": pcfg.init_kl_coef, "eval_score_before": None, "eval_kl_before": None}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, policy, optimizer, scheduler))
        log(f"resumed from {resume_from} at iteration {state['step']}/{total_iters}")
    metrics_log = MetricsLog(run_dir, cfg, state["step"])
    samples_dir = run_dir / "samples"

    def do_eval(step: int) -> dict:
        if not eval_prompts:
            return {}
        m, samples = evaluate_prompts(policy, eval_prompts, tokenizer, reward_fn, pcfg, tcfg.seed,
                                      device, autocast)  # fmt: skip
        samples_dir.mkdir(exist_ok=True)
        (samples_dir / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        metrics_log.write({"step": step, **m})
        log(f"held-out at iteration {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        return m

    if state["step"] == 0 and eval_prompts:
        before = do_eval(0)
        state["eval_score_before"], state["eval_kl_before"] = before["eval_score"], before.get("eval_kl")

    def prompts_for(it: int) -> list[dict]:
        epoch, b = divmod(it, per_epoch)
        return [train_prompts[i] for i in batch_order(len(train_prompts), pcfg.rollout_batch_size, tcfg.seed, epoch)[b]]

    # Ctrl-C / SIGTERM finish the current iteration, then checkpoint: a half-done iteration has
    # already changed the weights, so it could not be resumed exactly. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("stopping after this iteration (press Ctrl-C again to stop now, without a checkpoint)")

    handlers = {}
    if on_main_thread():
        handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = progress_bar(tcfg.progress, total_iters, state["step"])
    interrupted = in_iteration = False
    last: dict = {}
    t_start = time.perf_counter()
    try:
        while state["step"] < total_iters:
            in_iteration = True
            it = state["step"]
            t0 = time.perf_counter()
            roll = rollout(policy, prompts_for(it), tokenizer, reward_fn, pcfg, pcfg.temperature, device,
                           autocast)  # fmt: skip
            g = torch.Generator().manual_seed(tcfg.seed * 100_003 + it)  # mini-batch order: a function of (seed, it)
            record = ppo_update(policy, roll, state["kl_coef"], pcfg, optimizer, scheduler, params, tcfg, autocast, g)
            record["kl_coef"] = state["kl_coef"]
            state["kl_coef"] = update_kl_coef(state["kl_coef"], record["kl"], len(roll["seq"]), pcfg)
            state["step"] = step = it + 1
            in_iteration = False
            record = {"step": step, **record, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            last = record
            if step % tcfg.log_every == 0 or step == total_iters:
                metrics_log.write(record)
            progress.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", refresh=False)
            progress.update(1)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < total_iters:
                do_eval(step)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < total_iters:
                with checkpoint_write(run_dir):  # a Ctrl-C meanwhile waits for the checkpoint (then request_stop)
                    ckpt.save_checkpoint(run_dir, policy, optimizer, scheduler, state, keep=tcfg.keep_checkpoints)
            for cb in callbacks or []:
                cb(step, record)
            if stop["requested"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
        if in_iteration:
            log("interrupted mid-iteration: the last checkpoint stands (resume with --resume)")
        else:
            with checkpoint_write(run_dir, interrupting=True):  # another Ctrl-C waits for it; one more stops at once
                path = ckpt.save_checkpoint(run_dir, policy, optimizer, scheduler, state, keep=tcfg.keep_checkpoints)
            log(f"interrupted: checkpoint written to {path}; continue with: tunelab train CONFIG --resume")
    finally:
        progress.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    metrics = {
        "steps": state["step"],
        "trainable_params": trainable,
        "total_params": total,
        "kl_coef": state["kl_coef"],
        "seconds": time.perf_counter() - t_start,
        **{k: last[k] for k in ("score", "kl", "entropy", "response_length") if k in last},
        "eval_score_before": state["eval_score_before"],
        "eval_kl_before": state["eval_kl_before"],
        **{f"data_{k}": v for k, v in stats.items()},
    }
    if interrupted:
        metrics_log.close()
        return RunResult(run_dir, None, {**metrics, "interrupted": True})
    metrics.update(do_eval(state["step"]))
    metrics_log.close()
    final_dir = _save_final(run_dir, policy, tokenizer, method, cfg.model_copy(update={"model": base_model_cfg}),
                            manifest_extra, metrics)  # fmt: skip
    write_results_json(run_dir, metrics)
    log(f"result written to {final_dir}")
    return RunResult(run_dir, final_dir, metrics)


def _save_final(
    run_dir: Path, policy: PolicyWithValue, tokenizer, method, cfg, manifest_extra: dict, metrics: dict | None = None
) -> Path:
    """The policy as every run saves its result (final/ + tunelab.json, loadable by `load_run`), with the
    value head beside it (value_head.safetensors) for whoever continues the PPO run; all written atomically."""
    from safetensors.torch import save_file

    def save(lm, out_dir) -> None:
        method.save(lm, out_dir)
        head = {k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()}
        save_file(head, Path(out_dir) / "value_head.safetensors")

    extra = {**manifest_extra, "ppo": {"value_head": "value_head.safetensors"}}
    return save_result(run_dir, policy.lm, tokenizer, save, cfg, extra, metrics)


__all__ = ["train_ppo"]
