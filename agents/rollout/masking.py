"""Where PPOKL's action masks come from during a rollout: the env, or NLPO's masking policy.

A masked policy samples from pi^M(a|s) = pi(a|s) 1[a in M(s)] / pi(M(s)|s): its logits are set to
-inf outside the mask M(s). Two sources of M(s_t), both giving bool ``[N, V]`` (True = allowed):

- ``EnvMasks``: the env's own ``action_masks()``, read with sb3-contrib's ``get_action_masks``
  (lmgym's ``mask_top_k`` / ``mask_top_p``: the reference model's top-k / nucleus);
- ``NucleusMasks``: NLPO (Ramamurthy et al. 2022): the top-k / top-p of a frozen *masking policy*
  pi_mask, a copy of the policy re-synchronised every few iterations, decoded with its own KV
  cache next to the policy's.

``masked_logits`` applies a mask; ``masked_entropy`` is H(pi^M) with 0 log 0 = 0 (finite value
and gradient where logits are -inf).
"""
from __future__ import annotations

import copy

import torch
from sb3_contrib.common.maskable.utils import get_action_masks
from transformers import PreTrainedModel

from agents.vec_env import LMGymVecEnv
from lmgym.decoding import IncrementalDecoder
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
    masker = getattr(env.venv, "masker", None)
    return bool(masker is not None and masker.enabled)


class EnvMasks:
    """The env's ``action_masks()`` at each step (sb3-contrib's ``get_action_masks``)."""

    def __init__(self, env: LMGymVecEnv):
        self.env = env

    def current(self) -> torch.Tensor:
        return torch.from_numpy(get_action_masks(self.env))

    def advance(self, actions: torch.Tensor) -> None:
        """Nothing to do: the env has already taken the step."""


class NucleusMasks:
    """Top-k / top-p masks of a frozen masking LM, decoded incrementally over the rollout's batch."""

    def __init__(
        self, lm: PreTrainedModel, top_k: int | None, top_p: float | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ):
        self.top_k, self.top_p = top_k, top_p
        self.decoder = IncrementalDecoder(lm)
        self.logits = self.decoder.prefill(prompt_ids, prompt_mask).logits

    def current(self) -> torch.Tensor:
        return top_k_top_p_mask(self.logits.float().cpu(), self.top_k, self.top_p)

    def advance(self, actions: torch.Tensor) -> None:
        self.logits = self.decoder.append(actions).logits


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
