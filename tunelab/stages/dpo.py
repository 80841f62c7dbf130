"""dpo: the causal LM itself; DPO loss -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x))
- (log pi(y_l|x) - log ref(y_l|x))]) summed over pairs (docs/alignment.md has the maths). The reference
is the starting model, as the method declares it (tunelab/methods/reference.py, shared with PPO): the same
model with its PEFT adapter disabled, or (methods that change the weights themselves) a frozen copy taken
before training. loss_sum also returns per-pair sums of the implicit rewards' accuracy and margin, which
the loop logs beside the loss.

Why DPO is computed here rather than with TRL's DPOTrainer: DPOTrainer is a transformers Trainer with
its own loop, data pipeline and checkpoint format; the loss itself is a few lines. As a Stage, DPO gets
this project's checkpoints, exact resume, metrics, every method of the registry and the same result
folder as every other stage.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib

import torch
import torch.nn.functional as F

from tunelab.data.preference import collate_pairs
from tunelab.methods import get as get_method
from tunelab.methods import reference
from tunelab.models import load_model
from tunelab.models.loss import row_loss_sums
from tunelab.stages.base import Stage, require_causal
from tunelab.stages.preference import check_pairs, eval_pairs, pair_count, pairs_data


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log p(token | earlier tokens) over each row's response tokens (response_mask == 1): [rows].
    The LM head runs at response positions only (models/loss.py)."""
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    return -row_loss_sums(model, {**batch, "labels": labels})


def prepare_reference(model, cfg) -> None:
    """Called by the loop once the method is applied and before a resume restores trained weights, so the
    reference is always the starting model (methods/reference.py). SimPO and ORPO have none: no frozen copy."""
    if not reference_free(cfg):
        reference.prepare(model, get_method(cfg.method.name))


def reference_free(cfg) -> bool:
    """dpo.loss_type simpo or orpo: losses of the policy's own (length-normalised) log-probabilities, no reference."""
    return cfg.stage == "dpo" and cfg.dpo.loss_type in ("simpo", "orpo")


def dpo_notes(cfg) -> list[str]:
    """SimPO left at DPO's beta: the default fits DPO's summed log-ratios, not SimPO's per-token means."""
    d = cfg.dpo
    if d.loss_type == "simpo" and "beta" not in d.model_fields_set:
        return [f"dpo.loss_type simpo with dpo.beta {d.beta:g} (DPO's default, as TRL's CPOTrainer has it): SimPO's "
                "rewards are per-token means, and its paper trains with beta 2 to 2.5 and simpo_gamma about half of "
                "beta; set dpo.beta (and dpo.simpo_gamma) to follow it"]  # fmt: skip
    return []


REFERENCE = "reference_logps"  # a batch's pi_ref log-probs, where `ahead` computed them before the thread shares


def reference_logps(model, batch: dict, ref=None) -> torch.Tensor:
    """pi_ref's sequence_logps of the batch's rows. pi_ref does not train, so each row's value is kept (by the row's
    tokens and response mask) and a batch whose rows all were seen before (every epoch after the first, every
    evaluation after the first) skips the pass: TRL's precompute_ref_log_probs without a pass before training.
    `ref`: pi_ref where the caller holds `reference.policy(model)` already (`references_ahead`)."""
    if REFERENCE in batch:
        return batch[REFERENCE]
    table = reference.memo(model)
    keys = row_keys(batch) if table is not None and batch.keys() >= set(ROW_FIELDS) else None
    if keys is not None and all(k in table for k in keys):
        return torch.tensor([table[k] for k in keys], dtype=torch.float32, device=batch["input_ids"].device)
    with torch.no_grad(), contextlib.nullcontext(ref) if ref is not None else reference.policy(model) as pi_ref:
        out = sequence_logps(pi_ref, batch)
    if keys is not None:
        table.update(zip(keys, out.float().tolist()))
    return out


def in_turn(calls: list) -> list:
    """Each call's result, in order, one after the other (Stage.ahead's `run` where no threads are given)."""
    return [call() for call in calls]


def references_ahead(model, batches: list[dict], run=in_turn) -> None:
    """Stage.ahead: each pass's pi_ref log-probs, before the passes run as thread shares. pi_ref is often the trained
    model with its adapter switched off, which a share's pass beside it would see: the loop's thread switches it once
    for all of them, and `run` (accel's: a thread per share) runs the passes at once. A frozen copy is not on the model,
    and each share runs its own pass of it (SimPO and ORPO have no reference at all)."""
    if not reference.on_the_model(model):
        return
    with reference.policy(model) as ref:
        outs = run([functools.partial(reference_logps, model, batch, ref) for batch in batches])
    for batch, out in zip(batches, outs):
        batch[REFERENCE] = out


ROW_FIELDS = ("input_ids", "attention_mask", "response_mask")  # a padded batch's: what sequence_logps reads of it


def row_keys(batch: dict) -> list[bytes]:
    """A digest per row of its tokens and response mask (padding left out): what pi_ref's log-probs of it depend on."""
    ids, attn, resp = (batch[k].cpu() for k in ROW_FIELDS)
    keys = []
    for i in range(len(ids)):
        real = attn[i].bool()
        digest = hashlib.blake2b(ids[i][real].numpy().tobytes(), digest_size=16)
        digest.update(resp[i][real].to(torch.uint8).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def dpo_loss(logratio_chosen, logratio_rejected, beta: float, label_smoothing: float = 0.0, loss_type="sigmoid"):
    """Per-pair DPO loss from the policy/reference log-ratios of the chosen and rejected replies.

    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h = ratio_w - ratio_l
             (eps = label_smoothing: conservative DPO, for labels that are wrong with probability eps)
    ipo:     (h - 1 / (2 beta))^2 (Azar et al. 2023): regresses h to a fixed margin instead of pushing it
             to infinity"""
    h = logratio_chosen - logratio_rejected
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def simpo_loss(mean_chosen, mean_rejected, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024): -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma), the mean over each
    reply's tokens; no reference. `label_smoothing` as in cDPO."""
    h = beta * (mean_chosen - mean_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def orpo_loss(mean_chosen, mean_rejected, lam: float):
    """ORPO (Hong et al. 2024): the chosen reply's SFT loss (mean token NLL) + lam * -log sigmoid(log odds ratio),
    odds(y) = P / (1 - P) with P = exp(mean log pi(y)); no reference."""

    def log_odds(mean):
        return mean - torch.log1p(-torch.exp(mean.clamp(max=-1e-6)))

    return -mean_chosen - lam * F.logsigmoid(log_odds(mean_chosen) - log_odds(mean_rejected))


def response_lengths(batch: dict) -> torch.Tensor:
    """Each row's number of response tokens that a loss term predicts (the first position predicts nothing)."""
    return batch["response_mask"][:, 1:].sum(1).clamp(min=1).to(torch.float32)


def mean_logps(model, batch: dict) -> torch.Tensor:
    """Each row's response log-probability divided by its number of response tokens."""
    return sequence_logps(model, batch) / response_lengths(batch)


def _dpo_parts(model, batch):
    """(policy logps, reference logps) of the chosen rows and of the rejected rows."""
    pol, ref = sequence_logps(model, batch), reference_logps(model, batch)
    b = pol.shape[0] // 2
    return pol[:b], pol[b:], ref[:b], ref[b:]


def _free_parts(model, batch):
    """(mean log-probs of the chosen rows, of the rejected rows): SimPO's and ORPO's, without a reference."""
    m = mean_logps(model, batch)
    b = m.shape[0] // 2
    return m[:b], m[b:]


def _dpo_loss_fn(cfg):
    def loss_sum(model, batch):
        beta, eps, kind, alpha = cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.loss_type, cfg.dpo.sft_weight
        if kind in ("simpo", "orpo"):
            mc, mr = _free_parts(model, batch)
            loss = simpo_loss(mc, mr, beta, cfg.dpo.simpo_gamma, eps) if kind == "simpo" else orpo_loss(mc, mr, beta)
            chosen, rejected = beta * mc.detach(), beta * mr.detach()  # their rewards: beta x mean log-prob
        else:
            pc, pr, rc, rr = _dpo_parts(model, batch)
            loss = dpo_loss(pc - rc, pr - rr, beta, eps, kind)
            # implicit rewards beta * log(pi / ref) (Rafailov et al. 2023, section 5)
            chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
            mc = pc / response_lengths(batch)[: len(pc)]
        extras = {
            "reward_accuracy": (chosen > rejected).sum(),
            "reward_margin": (chosen - rejected).sum(),
            "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum(),
        }
        if alpha:  # RPO / CPO: the chosen reply's own SFT loss keeps its likelihood up
            loss = loss - alpha * mc
            extras["chosen_nll"] = -mc.detach().sum()
        return loss.sum(), loss.numel(), extras

    return loss_sum


def _dpo_final(model, tokenizer, cfg, data, device) -> dict:
    """Held-out: implicit-reward accuracy and margin, and how often the policy (and, for comparison, the
    reference = the starting policy) gives the chosen reply a higher log-probability than the rejected."""
    if not data.val:
        return {}
    beta = cfg.dpo.beta
    if reference_free(cfg):  # no reference: the rewards are beta x mean log-prob
        mc, mr = eval_pairs(_free_parts, model, data, tokenizer.pad_token_id, device, cfg.training.batch_size * 2)
        margin = beta * (mc - mr)
        return {
            "pairwise_accuracy": int((margin > 0).sum()) / len(margin),
            "reward_margin": float(margin.mean()),
            "chosen_mean_logp": float(mc.mean()),
            "rejected_mean_logp": float(mr.mean()),
        }
    pc, pr, rc, rr = eval_pairs(_dpo_parts, model, data, tokenizer.pad_token_id, device,
                                 cfg.training.batch_size * 2)  # fmt: skip
    margin = beta * ((pc - rc) - (pr - rr))
    return {
        "pairwise_accuracy": int((margin > 0).sum()) / len(margin),
        "reward_margin": float(margin.mean()),
        "chosen_logratio": float((pc - rc).mean()),
        "rejected_logratio": float((pr - rr).mean()),
        "policy_accuracy": int((pc > pr).sum()) / len(pc),
        "reference_accuracy": int((rc > rr).sum()) / len(rc),
    }


def load_policy(cfg, device):
    model, tokenizer = load_model(cfg.model, device=device)
    require_causal(model, cfg)
    return model, tokenizer


def stage(cfg) -> Stage:
    """The DPO stage for a config (its loss reads the `dpo` section)."""
    return Stage(
        "dpo", load_policy, pairs_data, collate_pairs,
        _dpo_loss_fn(cfg), pair_count, _dpo_final, lambda c: {"dpo": c.dpo.model_dump()}, prepare_reference,
        check_data=check_pairs, notes=dpo_notes, ahead=references_ahead,
    )  # fmt: skip
