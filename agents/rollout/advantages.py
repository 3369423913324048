"""KL-shaped token rewards and generalised advantage estimation over padded sequences.

Everything is [B, T] with a bool ``mask`` marking generated tokens; an episode ends at its last
valid token (EOS or the length limit), where the task reward is paid.
"""
from __future__ import annotations

import torch

import kl_estimators
from agents.options import KL_REWARDS


def per_token_kl(
    kind: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    analytic_kl: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The per-token KL term of the reward: a sampled estimate (k1/k2/k3) or the exact KL_t."""
    if kind == "none":
        return torch.zeros_like(logprobs)
    if kind == "analytic":
        return analytic_kl.float() * mask
    if kind in ("k1", "k2", "k3"):
        estimator = getattr(kl_estimators, kind)
        return estimator(logprobs, ref_logprobs, mask)
    raise ValueError(f"kl_reward must be one of {KL_REWARDS}, got {kind!r}")


def shaped_rewards(task_rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -beta * KL_t, plus the task reward at each sequence's last valid token."""
    rewards = -kl_coef * kl * mask
    last = last_valid_index(mask)
    rows = torch.arange(mask.shape[0])
    rewards[rows, last] += task_rewards * mask.any(dim=1)
    return rewards


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row (0 for an all-False row)."""
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; the state after the last valid token is terminal.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_k (gamma lambda)^k delta_{t+k}; returns = A + V.
    """
    mask_f = mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * gae_lambda * next_advantage
        advantages[:, t] = advantage * mask_f[:, t]
        next_value = values[:, t] * mask_f[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * mask_f
    return advantages, returns
