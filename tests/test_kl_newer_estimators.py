"""Where the KL estimators published after this library's set fall, proven by exact enumeration.

Each estimator is written here from its paper's public description, independently of
``kl_estimators``, as a per-token loss whose autograd gradient is the estimate (the convention of
``per_token_kl_loss``: sg = detach, score_t = grad log pi(y_t|s_t)). Its expected gradient under
pi and under mu is compared exactly (float64, every sequence enumerated, as in
``tests/test_kl_expectations.py``) with a ``GRADIENT_QUANTITIES`` entry or with a library
estimator. Formulas, as read from the sources (docs/variance.md, "Newer estimators"):

- FRPO (Future-KL regularised GRPO, arXiv 2601.10201): the local loss-side KL term plus a reverse
  cumulative sum of the later tokens' log-ratios k1 added to the advantage:
  local_t + score_t sg(sum_{t'>t} k1_t'). Read with a local term whose gradient is k1's
  (k2-loss, k1+, k3+) and with GRPO's usual k3 loss.
- CTPO (arXiv 2605.07331): the cumulative token ratio W_t = prod_{t'<=t} pi/mu on each token's term.
- TIKE (ACL 2026, "truncated top-k integration"): the per-position KL summed over pi's k most
  likely tokens only, weighted by the token ratio rho_t off-policy.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from tests.helpers.tabular import Tabular, make_tabular, tabulars

from kl_estimators import per_token_kl_loss

EXACT = dict(rtol=1e-9, atol=1e-10)
CASES = [dict(vocab=3, length=3, seed=seed, behaviour="random") for seed in range(4)]


def _score_and_k1(tab: Tabular) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ref_logp = tab.logprobs()
    return logp - logp.detach(), logp - ref_logp


def _strict_future(x: torch.Tensor) -> torch.Tensor:
    """sum_{t'>t} x_t'."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def frpo(tab: Tabular, local: str) -> torch.Tensor:
    """[N, T]: local_t + score_t sg(sum_{t'>t} k1_t'), local = k2 (k1's gradient) or k3."""
    score, k1 = _score_and_k1(tab)
    local_term = 0.5 * k1**2 if local == "k2" else torch.exp(-k1) - 1 + k1
    return local_term + score * _strict_future(k1).detach()


def ctpo_weights(tab: Tabular) -> torch.Tensor:
    """W_t = prod_{t'<=t} pi(y_t'|s_t') / mu(y_t'|s_t'), constant, [N, T]."""
    logp, _ = tab.logprobs()
    return (logp.detach() - tab.behaviour_logprobs()).cumsum(-1).exp()


def tike(tab: Tabular, k: int, off_policy: bool) -> torch.Tensor:
    """[N, T]: sum over pi's top-k tokens v at s_t of pi(v) log(pi(v) / pi_ref(v)), times sg(rho_t) off-policy."""
    logits, ref_logits = tab.logits()
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    top = logp.detach().topk(k, dim=-1).indices
    terms = (logp.exp() * (logp - ref_logp)).gather(-1, top).sum(-1)
    if off_policy:
        token_logp, _ = tab.logprobs()
        terms = terms * (token_logp.detach() - tab.behaviour_logprobs()).exp()
    return terms


def expected_gradient(tab: Tabular, terms: torch.Tensor, sampler: str) -> torch.Tensor:
    return tab.grad(tab.expect(terms.sum(-1), sampler))


def library(tab: Tabular, estimator: str, off_policy: bool) -> torch.Tensor:
    """[N, T] terms of a library estimator (behaviour log-probs passed off-policy)."""
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    behaviour = tab.behaviour_logprobs() if off_policy else None
    return per_token_kl_loss(estimator, logp, ref_logp, tab.mask, logits, ref_logits, behaviour_logprobs=behaviour)


def per_sequence_gradients(tab: Tabular, terms: torch.Tensor) -> torch.Tensor:
    """d(sum_t terms[y, t]) / d table for every sequence y, [N, rows, V]."""
    per_sequence = terms.sum(-1)
    return torch.stack([torch.autograd.grad(s, tab.table, retain_graph=True)[0] for s in per_sequence])


@settings(deadline=None, max_examples=20)
@given(tab=tabulars(behaviour=True))
def test_frpo_with_a_k1_gradient_local_term_is_reinforce_future_on_every_sequence(tab):
    """Per sequence, d/dtheta [k2_t + score_t sg(sum_{t'>t} k1_t')] = score_t sum_{t'>=t} k1_t':
    reinforce-future's gradient, sequence by sequence. So every moment is reinforce-future's:
    unbiased on-policy, biased off-policy without ratios (as ESTIMATOR_INFO states for it)."""
    torch.testing.assert_close(per_sequence_gradients(tab, frpo(tab, "k2")), per_sequence_gradients(tab, library(tab, "reinforce-future", False)), **EXACT)


@settings(deadline=None, max_examples=20)
@given(tab=tabulars())
def test_frpo_with_grpo_k3_local_term_replaces_the_direct_part_by_the_forward_kls(tab):
    """On-policy, E_pi[grad] = grad KL - direct + forward_direct: the future part of the reverse
    KL's gradient plus the direct part of the forward KL(pi_ref || pi)."""
    expected = tab.gradient_quantity("grad_kl", "pi") - tab.gradient_quantity("direct", "pi") + tab.gradient_quantity("forward_direct", "pi")
    torch.testing.assert_close(expected_gradient(tab, frpo(tab, "k3"), "pi"), expected, **EXACT)


def test_frpo_with_grpo_k3_local_term_is_biased():
    gaps = []
    for case in CASES:
        tab = make_tabular(**case)
        gaps.append(float((expected_gradient(tab, frpo(tab, "k3"), "pi") - tab.gradient_quantity("grad_kl", "pi")).abs().max()))
    assert max(gaps) > 1e-2


@settings(deadline=None, max_examples=20)
@given(tab=tabulars(behaviour=True))
def test_ctpo_weight_on_the_direct_term_has_analytic_is_expectation(tab):
    """E_mu[W_t KL_t(s_t)] = E_mu[W_{t-1} KL_t(s_t)] because E_{y_t ~ mu}[rho_t] = 1: the cumulative
    ratio through t on the per-position KL has analytic-is's expected gradient (direct_pi) on- and
    off-policy (with one more ratio in the weight)."""
    logits, ref_logits = tab.logits()
    kl_t = (logits.softmax(-1) * (logits.log_softmax(-1) - ref_logits.log_softmax(-1))).sum(-1)
    terms = ctpo_weights(tab) * kl_t
    torch.testing.assert_close(expected_gradient(tab, terms, "mu"), tab.gradient_quantity("direct_pi", "mu"), **EXACT)


def test_ctpo_weight_on_a_k1_return_is_biased_where_the_per_decision_form_is_not():
    """score_t sg(W_t sum_{t'>=t} k1_t'): the later tokens' rewards keep mu's distribution after t,
    so it is biased off-policy; reinforce-future-is weights each k1_t' by its own W_t' and is not."""
    gaps, library_gaps = [], []
    for case in CASES:
        tab = make_tabular(**case)
        score, k1 = _score_and_k1(tab)
        terms = (ctpo_weights(tab) * k1).detach() + score * (ctpo_weights(tab) * (_strict_future(k1) + k1)).detach()
        grad_kl = tab.gradient_quantity("grad_kl", "pi")
        gaps.append(float((expected_gradient(tab, terms, "mu") - grad_kl).abs().max()))
        library_gaps.append(float((expected_gradient(tab, library(tab, "reinforce-future-is", True), "mu") - grad_kl).abs().max()))
    assert max(gaps) > 1e-2
    assert max(library_gaps) < 1e-9


@settings(deadline=None, max_examples=20)
@given(tab=tabulars(behaviour=True))
def test_tike_with_every_token_is_analytic(tab):
    """k = V: TIKE's term is KL_t, analytic's, sequence by sequence on-policy; off-policy the
    token ratio leaves the states at mu's: E_mu[rho_t KL_t] = E_mu[KL_t], analytic's off-policy
    expectation (direct part at mu's states), not analytic-is's."""
    torch.testing.assert_close(tike(tab, tab.vocab, off_policy=False), library(tab, "analytic", False), **EXACT)
    torch.testing.assert_close(expected_gradient(tab, tike(tab, tab.vocab, off_policy=True), "mu"), tab.gradient_quantity("direct", "mu"), **EXACT)


@pytest.mark.parametrize("vocab", [3, 5])
def test_tike_truncated_is_biased_even_at_one_token(vocab):
    """k < V drops the other tokens' terms: biased at T = 1, where analytic is exact."""
    gaps = []
    for seed in range(4):
        tab = make_tabular(vocab=vocab, length=1, seed=seed)
        gaps.append(float((expected_gradient(tab, tike(tab, vocab - 1, off_policy=False), "pi") - tab.gradient_quantity("grad_kl", "pi")).abs().max()))
    assert max(gaps) > 1e-3
