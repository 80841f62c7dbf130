"""Preference stages on the one training loop: a reward model and DPO (docs/alignment.md has the maths).

  reward   *ForSequenceClassification with one output (a scalar head on the last non-pad token);
           Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)) summed over pairs; held-out pairwise
           accuracy and mean margin at the end
  dpo      the causal LM itself; DPO loss -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x))
           - (log pi(y_l|x) - log ref(y_l|x))]) summed over pairs; the reference is the same model with
           its PEFT adapter disabled, or (methods that change the weights themselves) a frozen copy
           taken before training

Both read `data.format: preference` files (tunelab/data/preference.py) and batch a pair as two rows of
one padded batch (B chosen rows, then B rejected rows), so one forward pass scores both. One loss term
is one pair. loss_sum also returns per-pair sums of extra metrics (reward accuracy and margin), which
the loop logs beside the loss.

Why DPO is computed here rather than with TRL's DPOTrainer: DPOTrainer is a transformers Trainer with
its own loop, data pipeline and checkpoint format; the loss itself is a few lines. As a Stage, DPO gets
this project's checkpoints, exact resume, metrics, every method of the registry and the same result
folder as every other stage.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from tunelab.data.build import DataBundle
from tunelab.data.preference import collate_pairs
from tunelab.training.loss import row_loss_sums
from tunelab.training.stages import Stage


# ---------------------------------------------------------------------------------------------- data
def _pairs_data(cfg, tokenizer) -> DataBundle:
    from tunelab.data import split_rows
    from tunelab.data.errors import DataError
    from tunelab.data.preference import encode_preference, read_preference_pairs

    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a preference file ({prompt, chosen, rejected}, hh-rlhf or "
                        "ShareGPT with chosen / rejected).")  # fmt: skip
    hub = {"hub_split": d.hub_split, "hub_config": d.hub_config}
    pairs, stats = read_preference_pairs(d.train, d.columns, d.limit, **hub)
    if d.validation:
        train_pairs = pairs
        val_pairs, vstats = read_preference_pairs(d.validation, d.columns, None, **hub)
        stats = {k: stats[k] + vstats[k] for k in stats}
    else:
        train_pairs, val_pairs = split_rows(pairs, d.val_fraction, cfg.training.seed)

    def encode(ps, part):
        out = []
        for i, p in enumerate(ps, 1):
            if d.system_prompt and p["prompt"][0]["role"] != "system":
                p = {**p, "prompt": [{"role": "system", "content": d.system_prompt}] + p["prompt"]}
            out.append(encode_preference(p, tokenizer, d.max_length, where=f"{part} pair {i}"))
        return out

    train, val = encode(train_pairs, "train"), encode(val_pairs, "validation")
    stats.update(
        train_pairs=len(train),
        val_pairs=len(val),
        truncated=sum(e["truncated"] for e in train + val),
        tokens=sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in train),
    )
    return DataBundle(train=train, val=val, stats=stats)


def _count(batch) -> int:
    return batch["input_ids"].shape[0] // 2


# -------------------------------------------------------------------------------------- reward model
def _reward_load(cfg, device):
    from transformers import AutoModelForSequenceClassification

    from tunelab.models import load_model

    # a fresh scalar head on the LM's last hidden state; the checkpoint's LM head is dropped
    return load_model(cfg.model, device=device, auto_class=AutoModelForSequenceClassification, num_labels=1,
                      ignore_mismatched_sizes=True)  # fmt: skip


def _rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    from tunelab.training.reward import reward_logits

    r = reward_logits(model, batch)
    b = r.shape[0] // 2
    return r[:b], r[b:]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen > rejected) under Bradley-Terry, P = sigmoid(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(r_chosen - r_rejected)


def _reward_loss(model, batch):
    rc, rr = _rewards(model, batch)
    margin = (rc - rr).detach()
    extras = {"reward_accuracy": (margin > 0).sum(), "reward_margin": margin.sum()}
    return bradley_terry_loss(rc, rr).sum(), rc.numel(), extras


@torch.no_grad()
def _eval_pairs(fn, model, data, pad_id, device, batch_size) -> list[torch.Tensor]:
    """fn(model, batch) -> tensors per pair, over all validation pairs, concatenated (model in eval mode)."""
    was_training = model.training
    model.eval()
    parts = []
    for i in range(0, len(data.val), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(data.val[i : i + batch_size], pad_id).items()}
        parts.append([t.float().cpu() for t in fn(model, batch)])
    model.train(was_training)
    return [torch.cat(p) for p in zip(*parts)]


def _reward_final(model, tokenizer, cfg, data, device) -> dict:
    if not data.val:
        return {}
    rc, rr = _eval_pairs(_rewards, model, data, tokenizer.pad_token_id, device, cfg.training.batch_size * 2)
    return {"pairwise_accuracy": int((rc > rr).sum()) / len(rc), "reward_margin": float((rc - rr).mean())}


REWARD = Stage(
    "reward",
    _reward_load,
    _pairs_data,
    collate_pairs,
    _reward_loss,
    _count,
    _reward_final,
    lambda cfg: {"reward": {"num_labels": 1, "max_length": cfg.data.max_length}},
)


# ----------------------------------------------------------------------------------------------- DPO
def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log p(token | earlier tokens) over each row's response tokens (response_mask == 1): [rows].
    The LM head runs at response positions only (training/loss.py)."""
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    return -row_loss_sums(model, {**batch, "labels": labels})


# Frozen reference copies for methods that change the model's own weights (full, freeze, bitfit ...),
# keyed by the trained model. PEFT models need none: their reference is the adapter switched off.
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _dpo_prepare(model, cfg) -> None:
    """Called by the loop once the method is applied and before a resume restores trained weights,
    so the copy is always of the starting model."""
    import copy

    if _is_peft(model):
        return
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    _REFERENCES[model] = ref


def reference_context(model):
    """A context in which `reference_model(model)` computes the reference policy's outputs."""
    return model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()


def reference_model(model):
    if _is_peft(model):  # inside reference_context: the wrapped model with its adapter layers off
        # (and without the wrapper's virtual tokens / logits hook for prompt and prefix tuning)
        return model.get_base_model()
    if model not in _REFERENCES:
        raise RuntimeError("DPO with a non-PEFT method needs its reference copy: call _dpo_prepare(model, cfg) first")
    return _REFERENCES[model]


def reference_logps(model, batch: dict) -> torch.Tensor:
    with torch.no_grad(), reference_context(model):
        return sequence_logps(reference_model(model), batch)


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


def _dpo_parts(model, batch):
    """(policy logps, reference logps) of the chosen rows and of the rejected rows."""
    pol, ref = sequence_logps(model, batch), reference_logps(model, batch)
    b = pol.shape[0] // 2
    return pol[:b], pol[b:], ref[:b], ref[b:]


def _dpo_loss_fn(cfg):
    beta, eps, kind = cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.loss_type

    def loss_sum(model, batch):
        pc, pr, rc, rr = _dpo_parts(model, batch)
        loss = dpo_loss(pc - rc, pr - rr, beta, eps, kind)
        # implicit rewards beta * log(pi / ref) (Rafailov et al. 2023, section 5)
        chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        extras = {
            "reward_accuracy": (chosen > rejected).sum(),
            "reward_margin": (chosen - rejected).sum(),
            "chosen_reward": chosen.sum(),
            "rejected_reward": rejected.sum(),
        }
        return loss.sum(), loss.numel(), extras

    return loss_sum


def _dpo_final(model, tokenizer, cfg, data, device) -> dict:
    """Held-out: implicit-reward accuracy and margin, and how often the policy (and, for comparison, the
    reference = the starting policy) gives the chosen reply a higher log-probability than the rejected."""
    if not data.val:
        return {}
    pc, pr, rc, rr = _eval_pairs(_dpo_parts, model, data, tokenizer.pad_token_id, device,
                                 cfg.training.batch_size * 2)  # fmt: skip
    beta = cfg.dpo.beta
    margin = beta * ((pc - rc) - (pr - rr))
    return {
        "pairwise_accuracy": int((margin > 0).sum()) / len(margin),
        "reward_margin": float(margin.mean()),
        "chosen_logratio": float((pc - rc).mean()),
        "rejected_logratio": float((pr - rr).mean()),
        "policy_accuracy": int((pc > pr).sum()) / len(pc),
        "reference_accuracy": int((rc > rr).sum()) / len(rc),
    }


def _lm_load(cfg, device):
    from tunelab.models import load_model

    return load_model(cfg.model, device=device)


def dpo_stage(cfg) -> Stage:
    """The DPO stage for a config (its loss reads the `dpo` section)."""
    return Stage(
        "dpo",
        _lm_load,
        _pairs_data,
        collate_pairs,
        _dpo_loss_fn(cfg),
        _count,
        _dpo_final,
        lambda c: {"dpo": c.dpo.model_dump()},
        _dpo_prepare,
    )
