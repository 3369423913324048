"""The KL-gradient configurations compared by the tabular study, and their per-batch surrogate.

Every configuration's surrogate is a loss L(theta) over a batch of sequences drawn from the
behaviour policy mu (the policy at the start of the batch; mu = pi for one step per batch) whose
gradient estimates -grad J / beta, J = E_pi[r] - beta KL(pi || pi_ref). Four families:

- ``loss:<estimator>`` (one step per batch): REINFORCE for the task reward, -sum_t score_t (r - b),
  plus ``kl_estimators.sequence_kl_loss(<estimator>)`` (PPOKL's ``kl_loss``, no KL in the reward),
  for every estimator of ``kl_estimators.ESTIMATOR_INFO``.
- ``reward:<k>[+grad]`` (one step per batch): PPOKL's KL in the reward, r_t = -beta k_t (k1, k2,
  k3 or the exact KL_t) plus r at the last token, REINFORCE with the return-to-go G_t; ``+grad``
  is PPOKL's ``analytic_grad``: A_t = G_t + beta k_t (the token's own KL term taken out) and
  beta sum_t KL_t(theta) added to the loss (``analytic-is``, as PPOKL).
- ``ppo:<k>[+grad]`` (K steps per batch): PPOKL's update, the advantages above computed once
  under mu times the clipped per-token ratio pi/mu (eps = 0.2); the analytic term is
  ``analytic-is`` (prefix importance weight), as in PPOKL.
- ``off:<estimator>`` (K steps per batch): the task-reward term weighted by the sequence ratio
  pi(y)/mu(y) (unbiased for every mu) plus ``sequence_kl_loss(<estimator>,
  behaviour_logprobs=log mu)``: the estimator's own off-policy behaviour.
- ``offline:<estimator>``: the same surrogate with mu = pi_ref for every step (data from the
  reference policy, never refreshed), so its fixed points are those of the estimator's
  off-policy expected gradient.

b is a leave-one-out batch mean of the return for sampled batches and 0 for exact expectations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kl_estimators
from studies.tabular_model import Instance, token_logprobs

PPO_CLIP = 0.2
KL_REWARDS = ("k1", "k2", "k3", "analytic")


@dataclass(frozen=True)
class Config:
    """One KL-gradient configuration (see the module docstring for the families)."""

    name: str
    family: str
    kl_loss: str | None = None
    kl_reward: str | None = None
    analytic_grad: bool = False
    steps_per_batch: int = 1
    offline: bool = False


@dataclass
class Batch:
    """Sequences from mu, with each row's gradient weight and mu's logit table (no gradient).

    ``row_weights`` scales the gradient reaching each sequence's surrogate: N mu(y) over all
    N sequences gives the exact expectation E_{y~mu}, 1 gives the minibatch mean.
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    reward: torch.Tensor
    behaviour_table: torch.Tensor
    row_weights: torch.Tensor
    exact: bool


def all_configs(steps_per_batch: int = 4) -> tuple[Config, ...]:
    """Every configuration of the study: on-policy families first, then the off-policy ones."""
    names = tuple(kl_estimators.ESTIMATOR_INFO)
    rewards = [(k, grad) for k in KL_REWARDS for grad in (False, True)]
    return (
        *(Config(f"loss:{name}", "loss", kl_loss=name) for name in names),
        *(Config(_reward_name(k, grad), "reward", kl_reward=k, analytic_grad=grad) for k, grad in rewards),
        *(
            Config("ppo:" + _reward_name(k, grad).split(":")[1], "ppo", kl_reward=k, analytic_grad=grad,
                   steps_per_batch=steps_per_batch)
            for k, grad in (("k1", False), ("k1", True), ("analytic", True), ("analytic", False))
        ),
        *(Config(f"off:{name}", "off", kl_loss=name, steps_per_batch=steps_per_batch) for name in names),
        *(Config(f"offline:{name}", "offline", kl_loss=name, offline=True) for name in names),
    )


def _reward_name(kind: str, analytic_grad: bool) -> str:
    return f"reward:{kind}{'+grad' if analytic_grad else ''}"


def _weight_rows(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Equal to ``x``; the gradient reaching row i is multiplied by weights[i]."""
    w = weights.reshape(-1, *[1] * (x.dim() - 1))
    return x.detach() + w * (x - x.detach())


def _token_kl(kind: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_exact: torch.Tensor) -> torch.Tensor:
    """The per-token KL term of the reward: k1/k2/k3 of the sampled token, or the exact KL_t."""
    if kind == "analytic":
        return kl_exact
    return getattr(kl_estimators, kind)(logprobs, ref_logprobs)


def _baseline(returns: torch.Tensor, exact: bool) -> torch.Tensor:
    """Leave-one-out mean of ``returns`` over the batch (0 for exact expectations)."""
    if exact or len(returns) < 2:
        return torch.zeros_like(returns)
    return (returns.sum() - returns) / (len(returns) - 1)


def _advantages(config: Config, batch: Batch, mu_logp, ref_logp, mu_kl, beta: float) -> torch.Tensor:
    """[B, T] advantages under mu: return-to-go of r_t = -beta k_t (+ r at the end), minus b."""
    kl_terms = torch.zeros_like(mu_logp)
    if config.kl_reward is not None:
        kl_terms = beta * _token_kl(config.kl_reward, mu_logp, ref_logp, mu_kl)
    rewards = -kl_terms
    rewards[:, -1] += batch.reward
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    advantages = returns - _baseline(returns[:, 0], batch.exact).unsqueeze(-1)
    if config.analytic_grad:
        advantages = advantages + kl_terms
    return advantages


def surrogate(config: Config, instance: Instance, table: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The loss whose gradient (w.r.t. ``table``) estimates -grad J / beta (see module docstring)."""
    beta = instance.beta
    logits = _weight_rows(table[batch.rows], batch.row_weights)
    ref_logits = instance.ref_table[batch.rows]
    logp = _weight_rows(token_logprobs(table, batch.rows, batch.tokens), batch.row_weights)
    ref_logp = token_logprobs(instance.ref_table, batch.rows, batch.tokens)
    mu_logp = token_logprobs(batch.behaviour_table, batch.rows, batch.tokens)
    mu_kl = kl_estimators.analytic(batch.behaviour_table, instance.ref_table)[batch.rows]
    advantages = _advantages(config, batch, mu_logp, ref_logp, mu_kl, beta)
    ratio = (logp - mu_logp).exp()
    if config.family == "ppo":
        clipped = ratio.clamp(1 - PPO_CLIP, 1 + PPO_CLIP)
        policy_term = -torch.minimum(ratio * advantages, clipped * advantages).sum(-1)
    elif config.family in ("off", "offline"):
        policy_term = -ratio.prod(-1) * advantages[:, 0]
    else:
        policy_term = -(logp * advantages).sum(-1)
    loss = policy_term.mean() / beta
    estimator = "analytic-is" if config.analytic_grad else config.kl_loss
    if estimator is not None:
        loss = loss + kl_estimators.sequence_kl_loss(
            estimator,
            logp,
            ref_logp,
            torch.ones_like(batch.tokens, dtype=torch.bool),
            logits,
            ref_logits,
            behaviour_logprobs=mu_logp,
        )
    return loss
