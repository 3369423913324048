"""Batched sampling of one episode per env with the policy's KV cache.

Each step costs one policy forward of length 1 for the whole batch (the prompt is encoded once);
the env supplies pi_ref's logits at every state, so the exact per-position KL is computed here.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import kl_estimators
from agents.policy import CausalLMPolicy
from agents.vec_env import LMGymVecEnv
from lmgym.decoding import IncrementalDecoder


def trim_left_padding(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row of a left-padded batch."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, dtype=torch.long)
    used = mask.any(dim=0)
    first = int(used.long().argmax()) if bool(used.any()) else mask.shape[1]
    return ids[:, first:], mask[:, first:]


@dataclass
class SampledStep:
    """One env step for all N envs; rows where ``active`` is False belong to no tracked episode."""

    active: torch.Tensor  # [N] bool: the env is still in the episode that started the rollout
    actions: torch.Tensor  # [N]
    logprobs: torch.Tensor  # [N] log pi(a_t | s_t)
    values: torch.Tensor  # [N] V(s_t)
    ref_logits: torch.Tensor  # [N, V] pi_ref logits at s_t
    ref_logprobs: torch.Tensor  # [N] log pi_ref(a_t | s_t)
    analytic_kl: torch.Tensor  # [N] KL(pi(.|s_t) || pi_ref(.|s_t))
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]
    new_obs: dict[str, np.ndarray]


def sample_episodes(
    policy: CausalLMPolicy,
    env: LMGymVecEnv,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_steps: int,
) -> Iterator[SampledStep]:
    """Step ``env`` (at the start of an episode in every sub-env, whose prompts are given) until
    every env has finished that episode or ``max_steps`` steps were taken."""
    device = policy.device
    decoder = IncrementalDecoder(policy.lm, output_hidden=True)
    out = decoder.prefill(prompt_ids.to(device), prompt_mask.to(device))
    active = torch.ones(env.num_envs, dtype=torch.bool)
    for t in range(max_steps):
        ref_logits = torch.from_numpy(np.array(env.current_ref_logits, dtype=np.float32))
        with torch.no_grad():
            logits = out.logits.float().cpu()
            values = policy.values_from_hidden(out.hidden).cpu()
            dist = torch.distributions.Categorical(logits=logits)
            actions = dist.sample()
            analytic_kl = kl_estimators.analytic(logits, ref_logits)
        new_obs, rewards, dones, infos = env.step(actions.numpy())
        yield SampledStep(
            active=active.clone(),
            actions=actions,
            logprobs=dist.log_prob(actions),
            values=values,
            ref_logits=ref_logits,
            ref_logprobs=torch.tensor([float(info["ref_logprob"]) for info in infos]),
            analytic_kl=analytic_kl,
            rewards=rewards,
            dones=dones,
            infos=infos,
            new_obs=new_obs,
        )
        active &= ~torch.as_tensor(dones)
        if not active.any() or t + 1 == max_steps:
            return
        out = decoder.append(actions.to(device))
