"""ppo: RLHF with PPO (docs/alignment.md). The stage supplies the policy (the starting model or an SFT
run, merged), the prompts and the reward R(x, y); the rollout loop that trains on them is
training/ppo.py, its maths training/ppo_math.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.config import ConfigError, ModelConfig
from tunelab.data import DataBundle, build_prompt_ids, read_rows
from tunelab.data.errors import DataError, where
from tunelab.data.preference import load_preference_pairs
from tunelab.methods import get as get_method
from tunelab.models import load_model
from tunelab.models.loading import hub_commit
from tunelab.stages.base import Stage, require_causal
from tunelab.stages.reward import load_reward_model, score
from tunelab.stages.runs import load_run, run_manifest

# reward_fn(prompts, responses, response_ids) -> one score per response (a 1-D tensor). prompts are chat
# messages, responses the decoded replies, response_ids their token ids (the policy's tokenizer, no eos).
RewardFn = Callable[[list[list[dict]], list[str], list[list[int]]], torch.Tensor]


# ------------------------------------------------------------------------------------ the policy
class PolicyWithValue(torch.nn.Module):
    """The trained causal LM and its value head. Its parameters are what a checkpoint holds."""

    def __init__(self, lm: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.lm = lm
        # zero-initialised: V = 0 at the start, so early advantages are the (whitened) returns themselves
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)


def load_policy(cfg, device):
    """(lm, tokenizer, the ModelConfig it rests on, extra manifest keys) for ppo.policy."""
    src = cfg.ppo.policy
    manifest = run_manifest(src) if src else None
    if manifest is None:
        model_cfg = cfg.model if not src else cfg.model.model_copy(update={"name": src})
        lm, tokenizer = load_model(model_cfg, device=device)
        require_causal(lm, cfg)
        commit = hub_commit(model_cfg)  # a hub id: the result pins the commit (stages/runs.load_run)
        return lm, tokenizer, model_cfg, {"base_commit": commit} if commit else {}
    if not get_method(manifest["method"]).CAPABILITIES.mergeable:
        raise ConfigError(
            f"ppo.policy: the run {src} used method {manifest['method']}, which cannot be merged into plain "
            "weights to start PPO from; train the SFT policy with lora, full or another mergeable method"
        )
    # the SFT result, merged: PPO's base
    lm, tokenizer = load_run(src, device=str(device), merge=True, trust_remote_code=cfg.model.trust_remote_code)
    return lm, tokenizer, ModelConfig(**manifest["base_model"]), {"base_run": str(Path(src).resolve())}


# ---------------------------------------------------------------------------------------- prompts
def _prompt_messages(source: str, number: int, row: dict) -> list[dict]:
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [{"role": m.get("role", "user"), "content": str(m["content"])} for m in prompt]
    raise DataError(
        f"{where(source, number)}: no usable `prompt` field (a string or a list of {{role, content}} messages); "
        "give each row a prompt, or use a preference file (hh-rlhf, {prompt, chosen, rejected}, ShareGPT)."
    )


def read_prompts(path: str) -> list[list[dict]]:
    """Chat-message prompts from a preference file (the prompts of its pairs) or a file of `prompt` rows."""
    rows = read_rows(path)
    first = rows[0][2] if rows else {}
    if "chosen" in first and "rejected" in first:
        return [pair["prompt"] for pair in load_preference_pairs(path)]
    return [_prompt_messages(src, n, row) for src, n, row in rows]


def load_prompts(pcfg, tokenizer, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) prompts as {"messages", "ids"}: deduplicated, too-long ones skipped, a seeded
    split so the held-out prompts are never trained on."""
    seen, prompts, too_long = set(), [], 0
    messages_list = read_prompts(pcfg.prompts)[pcfg.skip_prompts :]
    for messages in messages_list:
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        ids = build_prompt_ids(messages, tokenizer)
        if len(ids) > pcfg.max_prompt_length:
            too_long += 1
            continue
        prompts.append({"messages": messages, "ids": ids})
    random.Random(seed).shuffle(prompts)
    held_out, train = prompts[: pcfg.eval_prompts], prompts[pcfg.eval_prompts :][: pcfg.prompt_limit]
    if not train:
        raise DataError(
            f"{pcfg.prompts}: no training prompts left ({len(messages_list)} read, {too_long} longer than "
            f"ppo.max_prompt_length={pcfg.max_prompt_length}, {len(held_out)} held out)"
        )
    stats = {"prompts_read": len(messages_list), "prompts_too_long": too_long, "train_prompts": len(train),
             "eval_prompts": len(held_out)}  # fmt: skip
    return train, held_out, stats


# ---------------------------------------------------------------------------------------- rewards
def reward_function(rcfg, tokenizer, device, trust_remote_code: bool = False) -> RewardFn:
    """The configured R(x, y). The builtin ones are toys for tests and smoke runs; real runs use a reward model."""
    clip = rcfg.score_clip

    def clipped(fn: RewardFn) -> RewardFn:
        return fn if clip is None else (lambda p, r, ids: fn(p, r, ids).clamp(-clip, clip))

    def per_response(fn) -> RewardFn:
        return lambda prompts, responses, ids: torch.tensor([float(fn(x)) for x in ids])

    if rcfg.kind == "model":
        rm, rm_tokenizer = load_reward_model(rcfg.path, device=device, trust_remote_code=trust_remote_code)
        # the reward model reads text (its tokenizer may differ from the policy's)
        return clipped(lambda prompts, responses, ids: score(rm, rm_tokenizer, prompts, responses).float())
    if rcfg.kind == "length":
        target = rcfg.target_length
        return clipped(per_response(lambda ids: 1 - abs(len(ids) - target) / target))
    if rcfg.kind == "keyword":
        keyword = rcfg.keyword
        return clipped(per_response(lambda ids: sum(keyword in tokenizer.decode([t]) for t in ids) / max(len(ids), 1)))
    wanted = set(rcfg.token_ids)
    return clipped(per_response(lambda ids: sum(t in wanted for t in ids) / max(len(ids), 1)))


def _build(cfg, tokenizer) -> DataBundle:
    train, held_out, stats = load_prompts(cfg.ppo, tokenizer, cfg.training.seed)
    return DataBundle(train=train, val=held_out, stats=stats)


def stage(cfg=None) -> Stage:
    """Only loading and data: PPO samples its batches itself (Stage.loop "ppo")."""
    return Stage(
        "ppo", lambda cfg, device: load_policy(cfg, device)[:2], _build, None, None, None,
        manifest=None, loop="ppo",
    )  # fmt: skip
