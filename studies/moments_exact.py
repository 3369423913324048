"""Exact first and second moments of every KL-gradient estimator on a tabular policy (float64).

On a tabular autoregressive policy (``studies.tabular_model``) every one of the N = V^T sequences
is enumerated. For an estimator, g(y) = d S(y) / d theta is its gradient estimate from the single
sequence y (S(y) the sum over y's tokens of ``kl_estimators.per_token_kl_loss``, theta the logit
table, P entries); a batch of n sequences drawn i.i.d. from the sampler q (pi on-policy, the
behaviour policy mu off-policy) estimates with the batch mean of g, as ``sequence_kl_loss`` does.
With q(y) the exact sequence probabilities:

    E[g]   = sum_y q(y) g(y)
    Cov[g] = sum_y q(y) (g(y) - E[g]) (g(y) - E[g])^T                       [P, P]
    bias   = E[g] - grad KL(pi || pi_ref)
    MSE(n) = E|mean of n draws - grad KL|^2 = |bias|^2 + trace(Cov[g]) / n

trace(Cov) and the largest eigenvalue of Cov come from D = diag(sqrt q) (G - E[g]), G = [N, P]
the per-sequence gradients: Cov = D^T D, so trace = |D|_F^2 and lambda_max = sigma_max(D)^2.
grad KL is autograd of the exactly enumerated KL, independent of ``kl_estimators``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kl_estimators
from studies.tabular_model import SequenceSpace, gathered_logprobs, sequence_logprobs, token_logprobs


@dataclass(frozen=True)
class Problem:
    """pi (``table``), pi_ref and, off-policy, the behaviour policy mu: logit tables [rows, V]."""

    space: SequenceSpace
    table: torch.Tensor
    ref_table: torch.Tensor
    behaviour_table: torch.Tensor | None = None

    @property
    def sampler_table(self) -> torch.Tensor:
        return self.table if self.behaviour_table is None else self.behaviour_table

    def sampler_probs(self) -> torch.Tensor:
        """q(y) for every sequence, [N]: pi on-policy, mu off-policy."""
        return sequence_logprobs(self.space, self.sampler_table.detach()).exp()

    def kl(self, p_table: torch.Tensor, q_table: torch.Tensor) -> float:
        """Exact sequence-level KL(p || q) of two logit tables."""
        logp = sequence_logprobs(self.space, p_table.detach())
        logq = sequence_logprobs(self.space, q_table.detach())
        return float((logp.exp() * (logp - logq)).sum())

    def grad_kl(self) -> torch.Tensor:
        """grad_theta KL(pi || pi_ref), flattened [P]: autograd of the enumerated sum."""
        table = self.table.detach().clone().requires_grad_()
        logp = sequence_logprobs(self.space, table)
        ref_logp = sequence_logprobs(self.space, self.ref_table)
        kl = (logp.exp() * (logp - ref_logp)).sum()
        return torch.autograd.grad(kl, table)[0].flatten()


def per_sequence_terms(problem: Problem, tokens: torch.Tensor, estimator: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, S): each row's gradient estimate g(y) [B, P] and value S(y) [B] for sequences ``tokens``
    [B, T], with mu's log-probs passed off-policy. ``options`` go to ``per_token_kl_loss``.

    S(y) depends on the table only through the logit rows on y's own path, gathered into a
    [B, T, V] leaf; one backward of sum_b S_b gives every dS_b / d(row b's logits) at once (row b
    reaches no other S), and g(y) scatters them back onto the table's rows."""
    space = problem.space
    rows = space.rows(tokens)
    logits = problem.table.detach()[rows].requires_grad_()
    logp = gathered_logprobs(logits, tokens)
    ref_logp = token_logprobs(problem.ref_table, rows, tokens)
    behaviour = None
    if problem.behaviour_table is not None:
        behaviour = token_logprobs(problem.behaviour_table.detach(), rows, tokens)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    values = kl_estimators.per_token_kl_loss(
        estimator, logp, ref_logp, mask, logits, problem.ref_table[rows], behaviour_logprobs=behaviour, **options
    ).sum(-1)
    (row_grads,) = torch.autograd.grad(values.sum(), logits)
    grads = torch.zeros(len(tokens), *problem.table.shape, dtype=row_grads.dtype)
    grads.scatter_add_(1, rows.unsqueeze(-1).expand_as(row_grads), row_grads)
    return grads.flatten(1), values.detach()


@dataclass(frozen=True)
class Moments:
    """Exact moments of one estimator's per-sequence gradient g and value S under the sampler."""

    mean: torch.Tensor  # E[g], [P]
    bias_sq: float  # |E[g] - grad KL|^2
    trace: float  # trace Cov[g] = E|g - E g|^2
    top_eigenvalue: float  # largest eigenvalue of Cov[g]
    top_eigenvector: torch.Tensor  # its unit eigenvector, [P]
    value_bias: float  # E[S] - KL(pi || pi_ref)
    value_variance: float  # Var[S]

    def mse(self, n: float) -> float:
        """E|mean of n i.i.d. g - grad KL|^2 = |bias|^2 + trace / n."""
        return self.bias_sq + self.trace / n


def exact_moments(problem: Problem, estimator: str, **options) -> Moments:
    """Moments of ``estimator`` (with ``options``) by enumeration of all sequences (module docstring)."""
    grads, values = per_sequence_terms(problem, problem.space.sequences, estimator, **options)
    q = problem.sampler_probs()
    mean = q @ grads
    centred = (grads - mean) * q.sqrt().unsqueeze(-1)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    kl = problem.kl(problem.table, problem.ref_table)
    value_mean = float(q @ values)
    return Moments(
        mean=mean,
        bias_sq=float(((mean - problem.grad_kl()) ** 2).sum()),
        trace=float((centred**2).sum()),
        top_eigenvalue=float(singular[0] ** 2),
        top_eigenvector=vh[0],
        value_bias=value_mean - kl,
        value_variance=float(q @ (values - value_mean) ** 2),
    )
