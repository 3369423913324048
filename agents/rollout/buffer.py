"""Rollout storage for token-level PPO: one episode per environment, stored as sequences.

Memory/recomputation trade-off: the reference model's next-token logits are kept for every
generated position in float32 (``[n_envs, T, V]``: 10 x 48 x 49,152 x 4 B = 94 MB for the
default run), because the analytic KL gradient needs the whole reference distribution at each
position and recomputing it would cost one more reference forward per epoch (``ref_logits=
"recompute"`` does that instead: see ``agents.rollout.reference``). The seed kept
float64 logits per buffer entry *and* per-transition copies of the observation; here each
sequence is stored once (prompt ids + sampled tokens) and the policy's logits are recomputed in
``train`` by one forward per minibatch of whole sequences.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from gymnasium import spaces

from agents.rollout.advantages import gae, per_token_kl, shaped_rewards
from agents.rollout.records import SampledStep, SequenceBatch


class SequenceRolloutBuffer:
    """Stores one episode per env; the constructor matches SB3's rollout-buffer signature."""

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "cpu",
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        n_envs: int = 1,
        store_ref_logits: bool = True,
    ):
        self.store_ref_logits = store_ref_logits
        self.ref_hidden: torch.Tensor | None = None  # [n, T, d] in ref_logits="hidden", from the steps or after the rollout
        self.max_steps = buffer_size
        self.n_envs = n_envs
        self.vocab_size = int(action_space.n)
        self.device = torch.device(device)
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.action_masks: torch.Tensor | None = None  # [n, t, V] bool, allocated by the first masked step
        self.n_steps = 0
        # per-rollout storage, allocated by ``reset`` ([n, t] unless noted)
        self.prompt_ids = self.prompt_mask = torch.zeros(n_envs, 0, dtype=torch.long)  # [n, P]
        self.actions = torch.zeros(n_envs, 0, dtype=torch.long)
        self.mask = torch.zeros(n_envs, 0, dtype=torch.bool)  # generated tokens
        self.logprobs = self.ref_logprobs = self.values = self.analytic_kl = torch.zeros(n_envs, 0)
        self.ref_logits: torch.Tensor | None = None  # [n, t, V] with store_ref_logits
        self.task_rewards = torch.zeros(n_envs)  # [n] reward at each episode's end
        # set by ``compute_returns_and_advantage``
        self.kl = self.rewards = self.advantages = self.returns = torch.zeros(n_envs, 0)

    def reset(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Start a rollout from the (left-padded) prompts of the first observations."""
        self.prompt_ids = prompt_ids
        self.prompt_mask = prompt_mask
        n, t, v = self.n_envs, self.max_steps, self.vocab_size
        self.actions = torch.zeros(n, t, dtype=torch.long)
        self.mask = torch.zeros(n, t, dtype=torch.bool)
        self.logprobs = torch.zeros(n, t)
        self.ref_logprobs = torch.zeros(n, t)
        self.values = torch.zeros(n, t)
        self.analytic_kl = torch.zeros(n, t)
        self.ref_logits = torch.zeros(n, t, v) if self.store_ref_logits else None
        self.ref_hidden = None
        self.task_rewards = torch.zeros(n)
        self.action_masks = None
        self.n_steps = 0

    def add(self, step: SampledStep) -> None:
        """Record one env step; rows of envs that already finished their episode are padding."""
        t = self.n_steps
        if t >= self.max_steps:
            raise RuntimeError(f"rollout buffer is full ({self.max_steps} steps)")
        active = step.active
        self.mask[:, t] = active
        self.actions[:, t] = torch.where(active, step.actions, torch.zeros_like(step.actions))
        self.logprobs[:, t] = step.logprobs * active
        self.values[:, t] = step.values * active
        self.ref_logprobs[:, t] = step.ref_logprobs * active
        self.analytic_kl[:, t] = step.analytic_kl * active
        if self.ref_logits is not None:
            self.ref_logits[:, t] = step.ref_logits
        if step.ref_hidden is not None:
            if self.ref_hidden is None:
                self.ref_hidden = torch.zeros(self.n_envs, self.max_steps, step.ref_hidden.shape[-1], dtype=step.ref_hidden.dtype)
            self.ref_hidden[:, t] = step.ref_hidden
        if step.action_masks is not None:
            if self.action_masks is None:
                self.action_masks = torch.ones(self.n_envs, self.max_steps, self.vocab_size, dtype=torch.bool)
            self.action_masks[:, t] = step.action_masks | ~active.unsqueeze(-1)  # padding rows: no mask
        finished = active & torch.as_tensor(step.dones)
        self.task_rewards = torch.where(finished, torch.as_tensor(step.rewards, dtype=torch.float32), self.task_rewards)
        self.n_steps += 1

    def compute_returns_and_advantage(self, kl_reward: str, kl_coef: float, analytic_grad: bool) -> None:
        """KL-shaped rewards, then GAE. With ``analytic_grad`` the current token's KL term is taken
        out of its own advantage (A_t += beta KL_t): its gradient comes from the loss instead."""
        self._truncate()
        self.kl = per_token_kl(kl_reward, self.logprobs, self.ref_logprobs, self.analytic_kl, self.mask)
        self.rewards = shaped_rewards(self.task_rewards, self.kl, kl_coef, self.mask)
        self.advantages, self.returns = gae(self.rewards, self.values, self.mask, self.gamma, self.gae_lambda)
        if analytic_grad:
            self.advantages = self.advantages + kl_coef * self.kl

    def _truncate(self) -> None:
        """Drop the steps after the last one taken (every episode ended before ``max_steps``)."""
        t = self.n_steps
        self.actions, self.mask, self.logprobs = self.actions[:, :t], self.mask[:, :t], self.logprobs[:, :t]
        self.ref_logprobs, self.values, self.analytic_kl = self.ref_logprobs[:, :t], self.values[:, :t], self.analytic_kl[:, :t]
        self.ref_logits = None if self.ref_logits is None else self.ref_logits[:, :t]
        self.ref_hidden = None if self.ref_hidden is None else self.ref_hidden[:, :t]
        self.action_masks = None if self.action_masks is None else self.action_masks[:, :t]

    def sequences(self, indices: torch.Tensor) -> SequenceBatch:
        """The stored sequences at ``indices`` as model inputs plus training targets."""
        actions = self.actions[indices]
        mask = self.mask[indices]
        return SequenceBatch(
            input_ids=torch.cat([self.prompt_ids[indices], actions], dim=1).to(self.device),
            attention_mask=torch.cat([self.prompt_mask[indices], mask.long()], dim=1).to(self.device),
            actions=actions.to(self.device),
            mask=mask.to(self.device),
            old_logprobs=self.logprobs[indices].to(self.device),
            ref_logprobs=self.ref_logprobs[indices].to(self.device),
            ref_logits=None if self.ref_logits is None else self.ref_logits[indices].to(self.device),
            old_values=self.values[indices].to(self.device),
            advantages=self.advantages[indices].to(self.device),
            returns=self.returns[indices].to(self.device),
            ref_hidden=None if self.ref_hidden is None else self.ref_hidden[indices].to(self.device),
            action_masks=None if self.action_masks is None else self.action_masks[indices].to(self.device),
        )

    def get(self, sequences_per_batch: int, generator: torch.Generator | None = None) -> Iterator[SequenceBatch]:
        """Shuffled minibatches of whole sequences."""
        order = torch.randperm(self.n_envs, generator=generator)
        for start in range(0, self.n_envs, sequences_per_batch):
            yield self.sequences(order[start : start + sequences_per_batch])
