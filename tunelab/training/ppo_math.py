"""PPO's maths, pure functions of tensors (no model, no I/O): KL-penalised per-token rewards, generalised
advantage estimation, the clipped policy and value losses, the adaptive KL coefficient. The rollout
loop (training/ppo.py) calls them; tests check them against hand computations.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards r_t = -beta (log pi - log pi_ref)_t, with the score R(x, y) added on the last
    response token; and the per-token log-ratio (its sum over a response estimates KL(pi || pi_ref))."""
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * log_ratio
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, log_ratio


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016), right to left over the response:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns_t = A_t + V_t,
    with V = 0 past the end of a response (the episode ends at its last token)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def ppo_losses(new_logprobs, new_values, entropy, batch: dict, pcfg) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017) and clipped value loss, averaged over response tokens."""
    mask, adv = batch["mask"], batch["advantages"]
    log_ratio = new_logprobs - batch["logprobs"]
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1 - pcfg.cliprange, 1 + pcfg.cliprange)
    policy_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), mask)
    old_v, ret = batch["values"], batch["returns"]
    v_clipped = old_v + torch.clamp(new_values - old_v, -pcfg.cliprange_value, pcfg.cliprange_value)
    value_loss = 0.5 * masked_mean(torch.max((new_values - ret) ** 2, (v_clipped - ret) ** 2), mask)
    ent = masked_mean(entropy, mask)
    loss = policy_loss + pcfg.vf_coef * value_loss - pcfg.entropy_coef * ent
    with torch.no_grad():
        stats = {
            "policy_loss": float(policy_loss),
            "value_loss": float(value_loss),
            "clip_frac": float(masked_mean((pg_clipped > pg_unclipped).float(), mask)),
            "value_clip_frac": float(masked_mean(((new_values - old_v).abs() > pcfg.cliprange_value).float(), mask)),
            "approx_kl": float(0.5 * masked_mean(log_ratio**2, mask)),
        }
    return loss, stats


def update_kl_coef(kl_coef: float, kl: float, n_sequences: int, pcfg) -> float:
    """Ziegler et al. 2019, eq. 3: beta <- beta (1 + K_beta e), e = clip(KL / KL_target - 1, -0.2, 0.2),
    K_beta = n_sequences / horizon. KL above target raises beta, below target lowers it."""
    if pcfg.kl_control == "fixed":
        return kl_coef
    error = min(max(kl / pcfg.kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_sequences / pcfg.kl_horizon)
