"""Every claim of ``kl_estimators.ESTIMATOR_INFO``, proven by exact enumeration (float64).

On random tabular autoregressive pi, pi_ref and mu (vocab 2-5, length 1-4, mu = pi as a special
case), all V^T sequences are enumerated. E_q[gradient] is the gradient of sum_y q(y) S(y) with q
held constant, S the per-sequence sum of ``per_token_kl_loss``; q = pi on-policy
(``behaviour_logprobs=None``) and q = mu off-policy. It is compared with the exact quantity the
table names (autograd of exactly computed divergences in ``tests/helpers/tabular.py``), and the value
E_q[S] with KL(pi || pi_ref). Every "biased" claim (a False boolean) has a counterexample among
fixed cases. Nothing is sampled: a failure is a wrong claim or a bug, never noise.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings

from kl_estimators import ESTIMATOR_INFO, ESTIMATORS, GRADIENT_QUANTITIES, per_token_kl_loss, sequence_kl_loss
from kl_estimators.info import tex_prose
from tests.helpers.tabular import Tabular, make_tabular, tabulars

EXACT = dict(rtol=1e-9, atol=1e-10)
REGIMES = ("on", "off")
# Fixed cases for counterexamples: length 3, vocabulary 3, four seeds, mu a random table.
COUNTEREXAMPLE_CASES = [dict(vocab=3, length=3, seed=seed, behaviour="random") for seed in range(4)]


def estimate(tab: Tabular, estimator: str, regime: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_q[gradient of S], E_q[S]) for the sampler of ``regime``."""
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    behaviour = tab.behaviour_logprobs() if regime == "off" else None
    per_sequence = per_token_kl_loss(
        estimator, logp, ref_logp, tab.mask, logits, ref_logits, behaviour_logprobs=behaviour, **options
    ).sum(-1)
    expectation = tab.expect(per_sequence, "mu" if regime == "off" else "pi")
    return tab.grad(expectation), expectation.detach()


def claims(regime: str) -> list[tuple[str, str | None, bool, bool]]:
    """(estimator, gradient quantity, gradient unbiased, value unbiased) for every table entry."""
    return [
        (info.name, info.on_policy_gradient, info.unbiased_on_policy, info.value_unbiased_on_policy)
        if regime == "on"
        else (info.name, info.off_policy_gradient, info.unbiased_off_policy, info.value_unbiased_off_policy)
        for info in ESTIMATOR_INFO.values()
    ]


def test_table_covers_every_estimator_and_names_known_quantities():
    assert tuple(ESTIMATOR_INFO) == ESTIMATORS
    for info in ESTIMATOR_INFO.values():
        for key in (info.on_policy_gradient, info.off_policy_gradient):
            assert key is None or key in GRADIENT_QUANTITIES, (info.name, key)
        assert info.unbiased_on_policy == (info.on_policy_gradient == "grad_kl")
        assert info.unbiased_off_policy == (info.off_policy_gradient == "grad_kl")


def test_each_tex_term_names_the_symbols_of_its_plain_term():
    """The docs render ``term_tex``; it must say what ``term`` says: the same symbols (k1, k2, k3,
    KL, W, rho, score, sg), balanced braces, and no ``|`` (which would split a table cell)."""
    symbols = {"k1": r"\mathrm{k1}", "k2": r"\mathrm{k2}", "k3": r"\mathrm{k3}", "KL_": r"\mathrm{KL}",
               "W_": "W_", "rho": r"\rho", "score": r"\mathrm{score}", "sg(": r"\mathrm{sg}"}
    for info in ESTIMATOR_INFO.values():
        for plain, tex in symbols.items():
            assert (plain in info.term) == (tex in info.term_tex), (info.name, plain)
        assert info.term_tex.count("{") == info.term_tex.count("}") and "|" not in info.term_tex, info.name


def test_the_docs_show_every_expectation_formula_in_tex():
    """``tex_prose`` leaves no plain-text formula outside ``$...$`` in any on- or off-policy
    sentence: a new formula needs its TeX in ``_TEX_FRAGMENTS`` before the table renders it."""
    plain = re.compile(r"E_(pi|mu)\[|sum_t|\|\||_t\b|pi_ref|grad KL|\b(pi|mu)\b")
    for info in ESTIMATOR_INFO.values():
        for text in (info.on_policy, info.off_policy):
            shown = tex_prose(text)
            assert shown.count("$") % 2 == 0, shown
            outside = "".join(shown.split("$")[::2])
            assert not plain.search(outside), (info.name, outside)
    assert tex_prose("E_mu[sum_t k2_t] under mu") == r"$\mathbb{E}_\mu\big[\sum_t \mathrm{k2}_t\big]$ under $\mu$"


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(deadline=None, max_examples=25)
@given(tab=tabulars(behaviour=True))
def test_expected_gradient_and_value_are_as_claimed(estimator, regime, tab):
    """Where the table names a quantity, E_q[gradient] equals it; where it claims an unbiased
    value, E_q[S] = KL(pi || pi_ref). 25 cases per estimator and regime."""
    info = ESTIMATOR_INFO[estimator]
    key = info.on_policy_gradient if regime == "on" else info.off_policy_gradient
    value_unbiased = info.value_unbiased_on_policy if regime == "on" else info.value_unbiased_off_policy
    gradient, value = estimate(tab, estimator, regime)
    if key is not None:
        expected = tab.gradient_quantity(key, "pi" if regime == "on" else "mu")
        torch.testing.assert_close(gradient, expected, **EXACT)
    if value_unbiased:
        torch.testing.assert_close(value, tab.reverse_kl().detach(), **EXACT)


def _largest_gap(estimator: str, regime: str, exact: str) -> float:
    gaps = []
    for case in COUNTEREXAMPLE_CASES:
        tab = make_tabular(**case)
        gradient, value = estimate(tab, estimator, regime)
        if exact == "gradient":
            gaps.append(float((gradient - tab.grad(tab.reverse_kl())).abs().max()))
        else:
            gaps.append(float((value - tab.reverse_kl().detach()).abs()))
    return max(gaps)


@pytest.mark.parametrize(("estimator", "regime"), [(name, r) for r in REGIMES for name, _, ok, _ in claims(r) if not ok])
def test_biased_gradient_claims_have_a_counterexample(estimator, regime):
    assert _largest_gap(estimator, regime, "gradient") > 1e-2


@pytest.mark.parametrize(("estimator", "regime"), [(name, r) for r in REGIMES for name, _, _, ok in claims(r) if not ok])
def test_biased_value_claims_have_a_counterexample(estimator, regime):
    assert _largest_gap(estimator, regime, "value") > 1e-2


@settings(deadline=None, max_examples=40)
@given(tab=tabulars(max_length=1))
def test_named_quantities_at_one_token(tab):
    """At T = 1 the direct parts are grad KL, forward_direct is the forward KL's gradient and
    abs_direct twice the total variation's: the statements "at T = 1" of the table."""
    grad_kl = tab.grad(tab.reverse_kl())
    for key in ("direct", "direct_pi"):
        torch.testing.assert_close(tab.gradient_quantity(key, "pi"), grad_kl, **EXACT)
    torch.testing.assert_close(tab.gradient_quantity("forward_direct", "pi"), tab.grad(tab.forward_kl()), **EXACT)
    logp, ref_logp = tab.logprobs()
    total_variation_x2 = (logp.sum(-1).exp() - ref_logp.sum(-1).exp()).abs().sum()
    torch.testing.assert_close(tab.gradient_quantity("abs_direct", "pi"), tab.grad(total_variation_x2), **EXACT)


def test_direct_part_is_not_the_gradient_for_longer_sequences():
    tab = make_tabular(vocab=3, length=3, seed=0)
    gap = tab.gradient_quantity("direct", "pi") - tab.grad(tab.reverse_kl())
    assert gap.abs().max() > 1e-2


IGNORES_MU = [name for name, info in ESTIMATOR_INFO.items() if not info.uses_behaviour]


@pytest.mark.parametrize("estimator", IGNORES_MU)
@settings(deadline=None, max_examples=15)
@given(tab=tabulars(behaviour=True))
def test_sequence_importance_weighting_gives_the_on_policy_expectation(estimator, tab):
    """importance="sequence": E_mu[W_T grad S] = E_pi[grad S] and E_mu[W_T S] = E_pi[S], exactly."""
    off_gradient, off_value = estimate(tab, estimator, "off", importance="sequence")
    on_gradient, on_value = estimate(tab, estimator, "on")
    torch.testing.assert_close(off_gradient, on_gradient, **EXACT)
    torch.testing.assert_close(off_value, on_value, **EXACT)


@pytest.mark.parametrize("estimator", IGNORES_MU)
@settings(deadline=None, max_examples=15)
@given(tab=tabulars(max_length=1, behaviour=True))
def test_token_importance_weighting_is_exact_at_one_token(estimator, tab):
    off_gradient, off_value = estimate(tab, estimator, "off", importance="token")
    on_gradient, on_value = estimate(tab, estimator, "on")
    torch.testing.assert_close(off_gradient, on_gradient, **EXACT)
    torch.testing.assert_close(off_value, on_value, **EXACT)


def test_token_importance_weighting_is_biased_for_longer_sequences():
    """PPO-style token ratios miss the state-distribution shift: a counterexample for reinforce-future."""
    tab = make_tabular(vocab=3, length=3, seed=0, behaviour="random")
    off_gradient, _ = estimate(tab, "reinforce-future", "off", importance="token")
    assert (off_gradient - tab.grad(tab.reverse_kl())).abs().max() > 1e-2


@pytest.mark.parametrize("estimator", ["reinforce-future-is", "analytic-future-is", "k3-ratio", "k3+is"])
def test_weight_clip_above_every_weight_changes_nothing(estimator):
    tab = make_tabular(vocab=3, length=3, seed=1, behaviour="random")
    logp = tab.logprobs()[0].detach()
    largest = float((logp - tab.behaviour_logprobs()).cumsum(-1).exp().max())
    for a, b in zip(estimate(tab, estimator, "off"), estimate(tab, estimator, "off", weight_clip=2 * largest)):
        torch.testing.assert_close(a, b, **EXACT)
    clipped, _ = estimate(tab, estimator, "off", weight_clip=0.5)
    assert (clipped - estimate(tab, estimator, "off")[0]).abs().max() > 1e-3


def test_truncated_sequence_weights_are_the_truncated_is_expectation():
    """weight_clip=c with importance="sequence": E_mu[min(W, c) grad S] = E_pi[min(1, c/W) grad S]."""
    tab = make_tabular(vocab=3, length=2, seed=2, behaviour="random")
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    c = 0.7
    ratio = (logp.detach() - tab.behaviour_logprobs()).sum(-1).exp()
    gradient, _ = estimate(tab, "k3-loss", "off", importance="sequence", weight_clip=c)
    on_policy_terms = per_token_kl_loss("k3-loss", logp, ref_logp, tab.mask).sum(-1)
    expected = tab.grad(tab.expect(torch.clamp(c / ratio, max=1.0) * on_policy_terms, "pi"))
    torch.testing.assert_close(gradient, expected, **EXACT)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sequence_loss_is_the_batch_mean_of_per_token_sums(estimator):
    tab = make_tabular(vocab=3, length=3, seed=3, behaviour="random")
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    inputs = (estimator, logp, ref_logp, tab.mask, logits, ref_logits)
    behaviour = tab.behaviour_logprobs()
    torch.testing.assert_close(
        sequence_kl_loss(*inputs, behaviour_logprobs=behaviour),
        per_token_kl_loss(*inputs, behaviour_logprobs=behaviour).sum(-1).mean(),
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_explicit_behaviour_equal_to_pi_is_the_on_policy_estimator(estimator):
    """Passing mu = pi's own log-probs gives the on-policy terms in value and gradient."""
    tab = make_tabular(vocab=3, length=3, seed=4)
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    inputs = (estimator, logp, ref_logp, tab.mask, logits, ref_logits)
    on = per_token_kl_loss(*inputs)
    explicit = per_token_kl_loss(*inputs, behaviour_logprobs=logp.detach())
    torch.testing.assert_close(explicit, on, **EXACT)
    weights = torch.linspace(0.5, 2.0, on.numel(), dtype=on.dtype).reshape(on.shape)
    grads = [torch.autograd.grad((x * weights).sum(), tab.table, retain_graph=True)[0] for x in (explicit, on)]
    torch.testing.assert_close(*grads, **EXACT)


@settings(deadline=None, max_examples=25)
@given(tab=tabulars(behaviour=True))
def test_stale_sequence_k1_reward_with_sequence_ratio(tab):
    """TRL's RLOO after the first step: the penalty sum_t (log mu - log pi_ref) is fixed at the
    rollout policy and the loss weights the sequence score by W_T = pi(y)/mu(y) (no clipping here).
    E_mu[W_T grad log pi(y) (log mu(y) - log pi_ref(y))] = grad KL(pi || pi_ref) - grad KL(pi || mu),
    mu held fixed: biased unless mu = pi."""
    logp, ref_logp = tab.logprobs()
    mu_logp = tab.behaviour_logprobs()
    log_w = logp.sum(-1) - mu_logp.sum(-1)
    surrogate = torch.exp(log_w) * (mu_logp - ref_logp).sum(-1).detach()
    gradient = tab.grad(tab.expect(surrogate, "mu"))
    logp = tab.logprobs()[0]  # a fresh graph
    kl_to_mu = (logp.sum(-1).exp() * (logp - mu_logp).sum(-1)).sum()
    expected = tab.grad(tab.reverse_kl()) - tab.grad(kl_to_mu)
    torch.testing.assert_close(gradient, expected, **EXACT)
