"""Where PPOKL's action masks come from during a rollout: the env, or NLPO's masking policy.

A masked policy samples from pi^M(a|s) = pi(a|s) 1[a in M(s)] / pi(M(s)|s): its logits are set to
-inf outside the mask M(s). Two sources of M(s_t), both giving bool ``[N, V]`` (True = allowed):

- ``EnvMasks``: the env's own ``action_masks()``, read with sb3-contrib's ``get_action_masks``
  (lmgym's ``mask_top_k`` / ``mask_top_p``: the reference model's top-k / nucleus);
- ``NucleusMasks``: NLPO (Ramamurthy et al. 2022): the top-k / top-p of a frozen *masking policy*
  pi_mask, a copy of the policy re-synchronised every few iterations, decoded with its own KV
  cache in lockstep with the policy (it is one of the sampler's ``lmgym.decoding.LockstepDecoder``
  models).

Both follow ``StepMasks``: ``models`` are the LMs the sampler must decode alongside the policy, and
``current(outputs)`` gives the mask at s_t from those models' outputs there.

``masked_logits`` applies a mask; ``masked_entropy`` is H(pi^M) with 0 log 0 = 0 (finite value
and gradient where logits are -inf).
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch
from sb3_contrib.common.maskable.utils import get_action_masks
from transformers import PreTrainedModel

from agents.vec_env import LMGymVecEnv
from lmgym.decoding import DecoderOutput
from lmgym.masks import top_k_top_p_mask


def masked_logits(logits: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with -inf where ``masks`` is False (unchanged for ``masks=None``)."""
    return logits if masks is None else logits.masked_fill(~masks, float("-inf"))


def masked_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v over the last dim of log-probs that may be -inf (those terms are 0)."""
    finite = torch.where(torch.isneginf(log_probs), 0.0, log_probs)
    return -(log_probs.exp() * finite).sum(-1)


def env_masks_enabled(env: LMGymVecEnv) -> bool:
    """Whether ``env`` restricts actions (an lmgym env built with ``mask_top_k`` / ``mask_top_p``)."""
    return env.masks_actions


class StepMasks(Protocol):
    """Action masks along a rollout, bool ``[N, V]`` (True = allowed) at each state s_t."""

    models: list[PreTrainedModel]  # decoded in lockstep with the policy; their outputs reach current()

    def current(self, outputs: list[DecoderOutput]) -> torch.Tensor: ...


class EnvMasks:
    """The env's ``action_masks()`` at each step (sb3-contrib's ``get_action_masks``)."""

    def __init__(self, env: LMGymVecEnv):
        self.env = env
        self.models: list[PreTrainedModel] = []

    def current(self, outputs: list[DecoderOutput]) -> torch.Tensor:
        """The env's masks at its current state (``outputs`` is empty: no model of its own)."""
        return torch.from_numpy(get_action_masks(self.env))


class NucleusMasks:
    """Top-k / top-p masks of a frozen masking LM, decoded in lockstep with the policy."""

    def __init__(self, lm: PreTrainedModel, top_k: int | None, top_p: float | None):
        self.top_k, self.top_p = top_k, top_p
        self.models = [lm]

    def current(self, outputs: list[DecoderOutput]) -> torch.Tensor:
        """The top-k / top-p set of the masking LM's next-token distribution (``outputs[0]``)."""
        return top_k_top_p_mask(outputs[0].logits.float().cpu(), self.top_k, self.top_p)


def frozen_copy(lm: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``lm`` in eval mode with no gradients (NLPO's masking policy)."""
    copied = copy.deepcopy(lm).eval()
    copied.requires_grad_(False)
    return copied


def sync_masking_policy(masking_lm: PreTrainedModel, lm: PreTrainedModel) -> None:
    """Copy ``lm``'s weights into the masking policy, in place."""
    with torch.no_grad():
        for target, source in zip(masking_lm.state_dict().values(), lm.state_dict().values()):
            target.copy_(source)
