"""reward: *ForSequenceClassification with one output (a scalar head on the last non-pad token);
Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)) summed over pairs; held-out pairwise accuracy
and mean margin at the end. Then, using a trained reward model: load it, score replies.

    rm, tok = load_reward_model("runs/reward-hh")
    r = score(rm, tok, [[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])  # tensor [1]

A reward model is a causal LM with a scalar head (`AutoModelForSequenceClassification`, num_labels=1):
its score is the head applied to the hidden state of the last non-pad token of prompt + reply, rendered
with the chat template exactly as in training (tunelab/data/preference.py).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tunelab.config import ConfigError
from tunelab.data import pad
from tunelab.data.preference import collate_packed_pairs, collate_pairs, encode_response, truncate_left
from tunelab.models import load_model
from tunelab.models.loading import unwrap
from tunelab.models.loss import last_token_scores, packed_kwargs, score_head_split
from tunelab.stages.base import Stage
from tunelab.stages.preference import check_pairs, eval_pairs, pair_count, pairs_data
from tunelab.stages.runs import load_run, run_manifest


def load(cfg, device):
    # a fresh scalar head on the LM's last hidden state; the checkpoint's LM head is dropped
    model, tokenizer = load_model(cfg.model, device=device, auto_class=AutoModelForSequenceClassification,
                                  num_labels=1, ignore_mismatched_sizes=True)  # fmt: skip
    if cfg.data.packing and score_head_split(model) is None:
        raise ConfigError(
            f"data.packing: {type(unwrap(model)).__name__} is not a decoder with a `score` head over "
            "its backbone's last hidden state, which packed pairs need; set data.packing: false"
        )
    return model, tokenizer


def _rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    r = reward_logits(model, batch)
    b = r.shape[0] // 2
    return r[:b], r[b:]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen > rejected) under Bradley-Terry, P = sigmoid(r_chosen - r_rejected), per pair."""
    return -F.logsigmoid(r_chosen - r_rejected)


def loss_sum(model, batch):
    rc, rr = _rewards(model, batch)
    margin = (rc - rr).detach()
    extras = {"reward_accuracy": (margin > 0).sum(), "reward_margin": margin.sum()}
    return bradley_terry_loss(rc, rr).sum(), rc.numel(), extras


def final_metrics(model, tokenizer, cfg, data, device) -> dict:
    if not data.val:
        return {}
    rc, rr = eval_pairs(_rewards, model, data, tokenizer.pad_token_id, device, cfg.training.batch_size * 2)
    return {"pairwise_accuracy": int((rc > rr).sum()) / len(rc), "reward_margin": float((rc - rr).mean())}


def load_reward_model(run_dir, device="auto", trust_remote_code: bool = False):
    """(model, tokenizer) of a finished `stage: reward` run, in eval mode (a LoRA adapter merged in)."""
    manifest = run_manifest(run_dir)
    if manifest is None or manifest.get("stage") != "reward":
        stage = None if manifest is None else manifest.get("stage")
        raise ConfigError(f"{run_dir}: not a reward-model run (stage {stage!r}); train one with stage: reward")
    return load_run(str(run_dir), device=device, merge=True, trust_remote_code=trust_remote_code)


def reward_logits(model, batch: dict) -> torch.Tensor:
    """One score per row of a padded batch (input_ids, attention_mask): the head at the last non-pad token; or,
    for packed sequences (collate_packed_pairs: input_ids, position_ids, last), one per sequence, at `last`.

    transformers' *ForSequenceClassification picks the rightmost token that is not the pad id, so the
    batch must be right-padded with model.config.pad_token_id (collate_pairs and score do that). Packed rows
    hold several sequences: the backbone runs on them (causal attention within each sequence, as for packed
    SFT rows: the positions restart) and the head is applied at each sequence's last token."""
    if "last" not in batch:
        return last_token_scores(model, batch)[:, 0].float()
    backbone, head = score_head_split(model)
    positions = batch["position_ids"]  # accel: one attention call per packed sequence
    hidden = backbone(input_ids=batch["input_ids"], position_ids=positions, **packed_kwargs(model, positions),
                      use_cache=False).last_hidden_state  # fmt: skip
    return head(hidden.reshape(-1, hidden.shape[-1])[batch["last"]])[:, 0].float()


@torch.no_grad()
def score(model, tokenizer, prompts_messages, responses, max_length: int = 1024, batch_size: int = 8) -> torch.Tensor:
    """Rewards (float32, on the model's device) for each (prompt, reply); a prompt is a message list
    (or a string: one user message). A prompt longer than max_length loses its start, as in training."""
    if len(prompts_messages) != len(responses):
        raise ValueError(f"score: {len(prompts_messages)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    encoded = []
    for prompt, reply in zip(prompts_messages, responses):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        encoded.append(truncate_left(encode_response(messages, reply, tokenizer), max_length)["input_ids"])
    out = []
    for i in range(0, len(encoded), batch_size):
        ids, mask = pad(encoded[i : i + batch_size], pad_id)
        out.append(reward_logits(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}))
    return torch.cat(out) if out else torch.zeros(0, device=device)


def stage(cfg=None) -> Stage:
    return Stage(
        "reward", load, pairs_data,
        partial(collate_packed_pairs, width=cfg.data.max_length) if cfg is not None and cfg.data.packing else collate_pairs,
        loss_sum, pair_count, final_metrics,
        lambda cfg: {"reward": {"num_labels": 1, "max_length": cfg.data.max_length}},
        reload=lambda manifest: {
            "auto_class": AutoModelForSequenceClassification, "num_labels": 1, "ignore_mismatched_sizes": True,
        },
        check_data=check_pairs,
    )  # fmt: skip
