"""kto: the causal LM itself, trained on single replies labelled desirable or undesirable (Kahneman-Tversky
Optimization, Ethayarajh et al. 2024); docs/alignment.md has the maths.

With r = log pi(y|x) - log ref(y|x) (the implicit reward over beta, as DPO's) and z a batch's estimate of
KL(pi || ref), taken on mismatched prompt / reply rows (each prompt with the next example's reply) and not
differentiated:

    desirable y:    lambda_D (1 - sigmoid(beta (r - z)))
    undesirable y:  lambda_U (1 - sigmoid(beta (z - r)))         z = max(0, mean over the KL rows of r)

summed over the batch's examples (the loop divides by their number). z is one estimate per micro-batch
(`kl_estimate`: over every process's shard of it; where the micro-batch runs as thread shares, computed over all of
its rows before them: `kl_ahead`). The reference is the starting model, as the
method declares it (tunelab/methods/reference.py, shared with DPO and PPO). A batch of B examples is collated as 2B
rows, the examples then their KL rows (data/preference.py `collate_unpaired`); the policy runs the KL rows without
gradients (`_kto_parts`).

Why here rather than TRL's KTOTrainer: as with DPO (stages/dpo.py), the loss is a few lines, and as a stage it gets
this project's loop, checkpoints, exact resume, metrics, every method and the same result folder.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.data import DataBundle, cap_validation, split_rows
from tunelab.data.collate import STAND_IN
from tunelab.data.errors import DataError
from tunelab.data.preference import collate_unpaired, encode_unpaired, mismatched, read_unpaired
from tunelab.methods import reference
from tunelab.stages.base import Stage

# DPO's causal LM, its reference policy (the starting model) and its per-sequence log-probabilities
from tunelab.stages.dpo import (
    REFERENCE,
    ROW_FIELDS,
    in_turn,
    load_policy,
    prepare_reference,
    reference_logps,
    sequence_logps,
)
from tunelab.stages.preference import check_reading, checked_reading, eval_pairs, read_sources, with_system


def kto_loss(r, z, desirable, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example KTO loss: r = log pi/ref of each example's reply, z the KL estimate (a detached scalar),
    desirable a bool tensor."""
    return torch.where(
        desirable,
        desirable_weight * (1 - F.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - F.sigmoid(beta * (z - r))),
    )


def kl_estimate(kl_rows: torch.Tensor, training: bool, stand_in: bool = False) -> torch.Tensor:
    """z_ref: the mean log-ratio of a micro-batch's mismatched rows, clamped at 0 and not differentiated. In a
    multi-process run a training micro-batch is sharded over the processes: the mean is taken over every process's
    rows (as TRL gathers it), so two processes train as one process with their rows would; a process whose shard
    is empty runs a `stand_in` row (weight 0), which counts for nothing here. Evaluation batches are whole on each
    process (and their number may differ): their own rows."""
    import torch.distributed as dist

    total = torch.stack([kl_rows.detach().sum(), kl_rows.new_tensor(float(len(kl_rows)))])
    if stand_in:
        total = total * 0
    if training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


def _kto_parts(model, batch):
    """(log-ratios of the examples' replies, log-ratios of their KL rows). In training the policy runs the KL rows
    without gradients, as TRL's KTOTrainer does: z is not differentiated, so in the examples' pass they kept their
    activations and took a backward pass of zeros (the bench job's peak 3,070 -> 1,870 MB, docs/performance.md).
    Without gradients (evaluation) both halves run in one pass."""
    b = len(batch["label"])
    ref = reference_logps(model, batch)  # both halves in one pass: no gradients either way
    if not torch.is_grad_enabled():
        ratios = sequence_logps(model, batch) - ref
        return ratios[:b], ratios[b:]
    r = _reply_ratios(model, batch, ref)
    with torch.no_grad():
        kl = sequence_logps(model, _rows(batch, slice(b, None))) - ref[b:]
    return r, kl


Z = "kl_estimate"  # a training batch's z, where `kl_ahead` computed it over the whole micro-batch


def kl_ahead(model, batches: list[dict], run=in_turn) -> None:
    """Stage.ahead: before a micro-batch's passes run as thread shares, each pass's pi_ref log-probs (the reference may
    be the trained model with its adapter off: dpo's `references_ahead`) and z over every KL row of the micro-batch
    (the policy's log-ratios of those rows take no gradient), kept in each batch for its share; `run` runs the passes
    at once (accel's: a thread per share)."""
    with reference.policy(model) as ref:
        refs = run([functools.partial(reference_logps, model, batch, ref) for batch in batches])
    kl = run([functools.partial(_kl_ratios, model, batch, out) for batch, out in zip(batches, refs)])
    z = kl_estimate(torch.cat(kl), training=False)  # thread shares: one process
    for batch, out in zip(batches, refs):
        batch[REFERENCE], batch[Z] = out, z


def _reply_ratios(model, batch: dict, ref: torch.Tensor) -> torch.Tensor:
    """The policy's log-ratios of the batch's examples (its first half of rows), with gradients."""
    return sequence_logps(model, _rows(batch, slice(0, len(batch["label"])))) - ref[: len(batch["label"])]


def _kl_ratios(model, batch: dict, ref: torch.Tensor) -> torch.Tensor:
    """The policy's log-ratios of the batch's KL rows, without gradients."""
    b = len(batch["label"])
    with torch.no_grad():
        return sequence_logps(model, _rows(batch, slice(b, None))) - ref[b:]


def _rows(batch: dict, rows: slice) -> dict:
    """The batch's rows `rows` (collate_unpaired: the examples, then their KL rows), trimmed to their own width."""
    part = {k: batch[k][rows] for k in ROW_FIELDS}
    width = int(part["attention_mask"].sum(1).max()) if len(part["attention_mask"]) else 0
    return {k: v[:, :width] for k, v in part.items()}


def _kto_loss_fn(cfg):
    def loss_sum(model, batch):
        k = cfg.kto
        if Z in batch:  # z and pi_ref computed before the thread shares (kl_ahead)
            r, z = _reply_ratios(model, batch, batch[REFERENCE]), batch[Z]
        else:
            r, kl_rows = _kto_parts(model, batch)
            z = kl_estimate(kl_rows, model.training, stand_in=bool(batch.get(STAND_IN)))
        desirable = batch["label"].to(r.device).bool()
        loss = kto_loss(r, z, desirable, k.beta, k.desirable_weight, k.undesirable_weight)
        signed = torch.where(desirable, r, -r).detach()
        extras = {"reward_accuracy": (signed > 0).sum(), "signed_logratio": signed.sum(), "kl": z * len(r)}
        return loss.sum(), loss.numel(), extras

    return loss_sum


def count(batch) -> int:
    return len(batch["label"])


def _read(d, seed: int) -> tuple[list[dict], dict, list[dict] | None]:
    """(train examples, stats, validation examples or None) of a data section."""
    if not d.train:
        raise DataError("data.train is not set: give a file of replies labelled desirable or not ({prompt, "
                        "completion, label}) or of preference pairs")  # fmt: skip

    def read(src, limit, rows):
        part, stats = read_unpaired(src.path, src.cfg.columns, limit, roles=src.cfg.roles, rows=rows)
        return [{**e, "group": (src.path, e["group"])} for e in part], stats  # rows told apart across sources

    train, stats = read_sources(d, d.train, seed, "kto", read)
    if not d.validation:
        return train, stats, None
    val, vstats = read_sources(d, [d.validation], seed, "kto", read)
    return train, {k: stats.get(k, 0) + vstats.get(k, 0) for k in {*stats, *vstats}}, val


def check_examples(cfg) -> None:
    """Stage.check_data: the examples read and checked before the model loads; kto_data then takes them."""
    check_reading(cfg, "kto", _read)


def kto_data(cfg, tokenizer) -> DataBundle:
    d = cfg.data
    examples, stats, val = checked_reading(cfg, "kto", _read)
    if val is not None:
        train, val = examples, cap_validation(val, d.val_max_rows, cfg.training.seed)
    else:  # split by row: a pair's two replies (one prompt) stay on one side
        groups = list(dict.fromkeys(e["group"] for e in examples))
        _, held = split_rows(groups, d.val_fraction, cfg.training.seed, d.val_max_rows)
        held = set(held)
        train, val = [e for e in examples if e["group"] not in held], [e for e in examples if e["group"] in held]

    def encode(part, name):
        out = []
        for i, e in enumerate(part, 1):
            out.append(encode_unpaired(with_system(e, d.system_prompt), tokenizer, d.max_length, f"{name} example {i}"))
        return mismatched(out, d.max_length, cfg.training.seed) if out else out

    train, val = encode(train, "train"), encode(val, "validation")
    stats.update(train_examples=len(train), val_examples=len(val),
                 truncated=sum(e["truncated"] for e in train + val),
                 tokens=sum(len(e["input_ids"]) + len(e["kl_input_ids"]) for e in train))  # fmt: skip
    return DataBundle(train=train, val=val, stats=stats)


@torch.no_grad()
def _kto_final(model, tokenizer, cfg, data, device) -> dict:
    """Held-out: how often the implicit reward has the label's sign, the mean log-ratio of each kind of reply, the
    KL estimate, and where replies came in pairs (one of each kind to a prompt), how often the desirable one has
    the higher log-ratio: DPO's implicit-reward accuracy, comparable with it."""
    if not data.val:
        return {}
    r, kl, good = eval_pairs(lambda m, b: (*_kto_parts(m, b), b["label"]), model, data, tokenizer.pad_token_id,
                             device, cfg.training.batch_size, collate=collate_unpaired)  # fmt: skip
    good = good.bool()
    out = {
        "reward_accuracy": float((torch.where(good, r, -r) > 0).float().mean()),
        "desirable_logratio": float(r[good].mean()) if good.any() else float("nan"),
        "undesirable_logratio": float(r[~good].mean()) if (~good).any() else float("nan"),
        "kl": float(kl.mean().clamp(min=0)),
    }
    rows: dict = {}
    for i, e in enumerate(data.val):
        if e.get("group") is not None:
            rows.setdefault(e["group"], []).append(i)
    pairs = [(a, b) if good[a] else (b, a) for a, b in (v for v in rows.values() if len(v) == 2) if good[a] != good[b]]
    if pairs:
        out["pairwise_accuracy"] = sum(float(r[w] > r[lo]) for w, lo in pairs) / len(pairs)
        out["pairs"] = len(pairs)
    return out


def stage(cfg) -> Stage:
    """The KTO stage for a config (its loss reads the `kto` section)."""
    return Stage(
        "kto", load_policy, kto_data, collate_unpaired, _kto_loss_fn(cfg), count, _kto_final,
        lambda c: {"kto": c.kto.model_dump()}, prepare_reference, check_data=check_examples, ahead=kl_ahead,
    )  # fmt: skip
