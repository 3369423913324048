"""Reference-model logits for the PPO update: stored during the rollout, or recomputed per minibatch.

The analytic KL gradient needs pi_ref's whole next-token distribution at every generated
position. With N sequences per rank, T generated tokens, vocabulary V and b sequences per
minibatch (float32 logits, 4 bytes):

- ``store``: the rollout buffer keeps ``N x T x V x 4`` bytes from sampling until the update ends
  (they come free from the env, which computes them anyway); no extra forward.
- ``recompute``: the buffer keeps no logits; each minibatch costs one reference forward under
  ``no_grad`` and holds ``b x T x V x 4`` bytes while its loss is computed (plus the forward's
  transient activations); ``n_epochs`` extra reference forwards over the whole rollout per update.

Recomputing saves ``(N - b) x T x V x 4`` bytes: it wins whenever a minibatch is smaller than the
rollout, at the price of roughly one third of a policy forward+backward per minibatch.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedModel

from agents.buffer import SequenceBatch
from lmgym.decoding import forward_last

REF_LOGITS_MODES = ("store", "recompute")


def check_ref_logits_mode(mode: str) -> None:
    """ValueError naming ``ref_logits`` for an unknown mode."""
    if mode not in REF_LOGITS_MODES:
        raise ValueError(f"ref_logits must be one of {REF_LOGITS_MODES}, got {mode!r}")


@torch.no_grad()
def reference_logits(
    ref_model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int
) -> torch.Tensor:
    """pi_ref's float32 logits ``[b, T, V]`` at the states before each of the last ``n_actions``
    tokens of the left-padded rows (the layout of ``CausalLMPolicy.sequence_forward``)."""
    device = ref_model.device
    out = forward_last(ref_model, input_ids.to(device), attention_mask.to(device), n_actions + 1)
    return out.logits[:, :-1].float().to(input_ids.device)


def with_reference_logits(batch: SequenceBatch, ref_model: PreTrainedModel) -> SequenceBatch:
    """``batch`` with its ``ref_logits`` recomputed by one forward of ``ref_model``."""
    logits = reference_logits(ref_model, batch.input_ids, batch.attention_mask, batch.actions.shape[1])
    return dataclasses.replace(batch, ref_logits=logits)
