"""``studies.moments_exact``: exact moments checked against Monte Carlo, and the exact zeros.

Monte Carlo draws sequences with the autoregressive sampler (``SequenceSpace.sample``), not from
the enumerated probabilities, and recomputes each draw's gradient on the sampled tokens, so the
comparison checks the enumeration, the weighting by q(y) and the covariance algebra together.
Each exact quantity Q is compared with its sample mean over n = 8,000 draws: |Q_mc - Q| <= 6
standard errors of Q_mc (the standard error estimated from the same draws; for the mean vector,
the largest over its components). A fixed seed makes the test deterministic. Over 5 sampling
seeds x the 6 cases, the largest deviation measured was 2.8 standard errors; a deviation beyond 6
has probability below 1e-8 per compared number under the normal approximation, so the tolerance
is not tuned to the seed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kl_estimators
from studies.moments import Cell, all_cells, compute_cell
from studies.moments_grid import unbiased
from studies.moments_exact import Problem, exact_moments, per_sequence_terms
from studies.tabular_model import make_instance

N_DRAWS = 8_000
Z = 6.0


def tiny_problem(off_policy: bool, seed: int = 0, vocab: int = 2, length: int = 3) -> Problem:
    instance = make_instance(vocab, length, beta=1.0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    table = instance.ref_table + torch.randn(instance.ref_table.shape, generator=gen, dtype=torch.float64)
    behaviour = table + 0.5 * torch.randn(table.shape, generator=gen, dtype=torch.float64) if off_policy else None
    return Problem(instance.space, table, instance.ref_table, behaviour)


def _within(mc: torch.Tensor, exact: torch.Tensor | float) -> None:
    """The mean of per-draw values ``mc`` [n, ...] is within Z standard errors of ``exact``."""
    mean, se = mc.mean(0), mc.std(0) / mc.shape[0] ** 0.5
    z = ((mean - exact).abs() / se.clamp_min(1e-12)).max()
    assert z < Z, f"{float(z):.1f} standard errors"


@pytest.mark.parametrize(
    ("estimator", "off_policy"),
    [("reinforce", False), ("analytic-future", False), ("k3-loss", False), ("k2-loss", False),
     ("reinforce-future-is", True), ("analytic-future-is", True)],
)  # fmt: skip
def test_exact_moments_match_monte_carlo(estimator, off_policy):
    """Mean vector (every component), trace Cov, v^T Cov v for the top eigenvector v, and the
    batch MSE(4) = E|mean of 4 draws - grad KL|^2 against their Monte Carlo estimates."""
    problem = tiny_problem(off_policy)
    exact = exact_moments(problem, estimator)
    gen = torch.Generator().manual_seed(1)
    tokens = problem.space.sample(problem.sampler_table, N_DRAWS, gen)
    grads = torch.cat([per_sequence_terms(problem, chunk, estimator)[0] for chunk in tokens.split(2000)])
    _within(grads, exact.mean)
    centred = grads - exact.mean
    _within((centred**2).sum(-1), exact.trace)
    _within((centred @ exact.top_eigenvector) ** 2, exact.top_eigenvalue)
    batch_errors = (grads.reshape(-1, 4, grads.shape[-1]).mean(1) - problem.grad_kl()).pow(2).sum(-1)
    _within(batch_errors, exact.mse(4))


def test_unbiased_estimators_have_zero_bias_and_biased_ones_do_not():
    problem = tiny_problem(off_policy=False, length=3)
    for name, info in kl_estimators.ESTIMATOR_INFO.items():
        bias_sq = exact_moments(problem, name).bias_sq
        assert (bias_sq < 1e-20) == info.unbiased_on_policy, (name, bias_sq)


@settings(deadline=None, max_examples=10)
@given(vocab=st.integers(2, 5), seed=st.integers(0, 2**16), off_policy=st.booleans())
def test_analytic_direct_term_has_zero_variance_at_one_token(vocab, seed, off_policy):
    """At T = 1 the analytic terms are the exact KL gradient at the one state, whatever y is."""
    problem = tiny_problem(off_policy, seed=seed, vocab=vocab, length=1)
    names = ("analytic", "analytic-future") + (("analytic-is", "analytic-future-is") if off_policy else ())
    for name in names:
        m = exact_moments(problem, name)
        assert m.trace < 1e-24 and m.top_eigenvalue < 1e-24, name
        if not off_policy:
            assert m.bias_sq < 1e-24 and m.value_variance < 1e-24, name


def test_every_estimator_but_k1_loss_is_zero_at_the_reference():
    """pi = pi_ref: k1_t = 0 and KL_t = 0 everywhere, so every per-sequence gradient is 0 except
    k1-loss's, sum_t score_t (mean 0, variance > 0)."""
    instance = make_instance(3, 2, beta=1.0, seed=3)
    problem = Problem(instance.space, instance.ref_table.clone(), instance.ref_table)
    for name in kl_estimators.ESTIMATORS:
        m = exact_moments(problem, name)
        assert m.bias_sq < 1e-24, name
        assert (m.trace > 1e-3) == (name == "k1-loss"), (name, m.trace)


def test_options_reach_the_estimator():
    """A weight clip above every weight changes nothing; a clip at 0.5 biases the sequence-weighted estimator."""
    problem = tiny_problem(off_policy=True)
    plain = exact_moments(problem, "reinforce-future", importance="sequence")
    clipped = exact_moments(problem, "reinforce-future", importance="sequence", weight_clip=1e6)
    assert plain.trace == pytest.approx(clipped.trace, rel=1e-12)
    assert exact_moments(problem, "reinforce-future", importance="sequence", weight_clip=0.5).bias_sq > 1e-6


def test_cell_records_every_estimator_and_the_unbiased_flags():
    cell = Cell("stale", vocab=2, length=2, beta=1.0, seed=0, staleness=0.5)
    data = compute_cell(cell)
    labels = [row["label"] for row in data["estimators"]]
    assert labels[: len(kl_estimators.ESTIMATORS)] == list(kl_estimators.ESTIMATORS)
    assert data["kl_mu_pi"] > 0
    for row in data["estimators"]:
        if row["unbiased"]:
            assert row["bias_sq"] < 1e-20, row["label"]
    assert unbiased("reinforce-future", {"importance": "sequence"}, off_policy=True)
    assert not unbiased("reinforce-future", {"importance": "token"}, off_policy=True)
    assert not unbiased("reinforce-future-is", {"weight_clip": 2.0}, off_policy=True)


def test_cells_have_unique_names():
    names = [cell.name for cell in all_cells()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("estimator", ["reinforce-future-is", "analytic-future-is", "k3-ratio"])
def test_per_sequence_gradient_is_autograd_of_that_sequence_alone(estimator):
    """g(y) from the batched gather-and-scatter equals d S(y) / d table for y alone."""
    problem = tiny_problem(off_policy=True, vocab=3, length=3)
    tokens = problem.space.sequences[[0, 7, 20]]
    grads, _ = per_sequence_terms(problem, tokens, estimator)
    for i in range(len(tokens)):
        table = problem.table.detach().clone().requires_grad_()
        one = tokens[i : i + 1]
        rows = problem.space.rows(one)
        logp = table.log_softmax(-1)[rows].gather(-1, one.unsqueeze(-1)).squeeze(-1)
        ref_logp = problem.ref_table.log_softmax(-1)[rows].gather(-1, one.unsqueeze(-1)).squeeze(-1)
        mu_logp = problem.behaviour_table.log_softmax(-1)[rows].gather(-1, one.unsqueeze(-1)).squeeze(-1)
        s = kl_estimators.per_token_kl_loss(
            estimator, logp, ref_logp, torch.ones_like(one, dtype=torch.bool), table[rows], problem.ref_table[rows],
            behaviour_logprobs=mu_logp,
        ).sum()
        torch.testing.assert_close(grads[i], torch.autograd.grad(s, table)[0].flatten(), rtol=1e-12, atol=1e-14)
