"""The rollout's records: one sampled env step (``SampledStep``) and a minibatch of whole sequences
(``SequenceBatch``). A leaf: the sampler, the buffer and the reference scorer all import it, it
imports none of them (torch and numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class SampledStep:
    """One env step for all N envs; rows where ``active`` is False belong to no tracked episode."""

    active: torch.Tensor  # [N] bool: the env is still in the episode that started the rollout
    actions: torch.Tensor  # [N]
    logprobs: torch.Tensor  # [N] log pi(a_t | s_t)
    values: torch.Tensor  # [N] V(s_t)
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]
    new_obs: dict[str, np.ndarray]
    ref_logits: torch.Tensor | None = None  # [N, V] pi_ref logits at s_t
    ref_logprobs: torch.Tensor | None = None  # [N] log pi_ref(a_t | s_t)
    analytic_kl: torch.Tensor | None = None  # [N] KL(pi(.|s_t) || pi_ref(.|s_t))
    action_masks: torch.Tensor | None = None  # [N, V] bool allowed tokens at s_t, None if unmasked
    ref_hidden: torch.Tensor | None = None  # [N, d] pi_ref's final hidden state at s_t (fused_reference)


@dataclass
class SequenceBatch:
    """A minibatch of whole sequences: prompt (left-padded) followed by the sampled tokens."""

    input_ids: torch.Tensor  # [b, P + T]
    attention_mask: torch.Tensor  # [b, P + T]
    actions: torch.Tensor  # [b, T]
    mask: torch.Tensor  # [b, T] bool, generated tokens
    old_logprobs: torch.Tensor  # [b, T]
    ref_logprobs: torch.Tensor  # [b, T]
    ref_logits: torch.Tensor | None  # [b, T, V], None when not stored (see agents.rollout.reference)
    old_values: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b, T]
    returns: torch.Tensor  # [b, T]
    ref_hidden: torch.Tensor | None = None  # [b, T, d] pi_ref's final hidden states (ref_logits="hidden")
    action_masks: torch.Tensor | None = None  # [b, T, V] bool allowed tokens, None when unmasked
