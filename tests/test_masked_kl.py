"""The KL of a masked policy, by exact enumeration (float64).

With a state-dependent mask M(s) the policy that writes is pi^M(a|s) = pi(a|s) 1[a in M(s)] / pi(M(s)|s)
(logits -inf outside M). PPOKL re-applies the rollout's masks in its update, so every estimator
sees pi^M as *the* policy and penalises KL(pi^M || pi_ref), whose per-position value is the
analytic KL over the allowed tokens. Proven here on tabular policies with masks that are fixed
(random) or come from a stale masking policy (the top-p of an older copy of pi, as NLPO's):

1. every claim of ``ESTIMATOR_INFO`` holds for pi^M, on-policy and off-policy with a behaviour
   mu^M masked by the same M: the unbiased estimators stay unbiased for grad KL(pi^M || pi_ref);
2. framework-style (sampling with the mask, e.g. a top-p sampler, but scoring the unmasked pi in
   the loss): each estimator that ignores mu converges to its off-policy quantity with mu = pi^M,
   never to grad KL(pi^M || pi_ref) nor to grad KL(pi || pi_ref);
3. a masked pi^M scored on tokens an unmasked behaviour policy sampled outside M: ValueError,
   never a silent NaN.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_estimators import ESTIMATOR_INFO, ESTIMATORS, analytic, per_token_kl_loss
from studies.nlpo_report import K3_VALUE_ESTIMATORS
from tests.helpers.masked_tabular import SupportTabular, framework_estimate, framework_model, make_mask, masked_kl_gradient, masked_model
from tests.helpers.tabular import Tabular, make_tabular

EXACT = dict(rtol=1e-9, atol=1e-10)
K3_VALUES = K3_VALUE_ESTIMATORS  # the docs' masked-KL table states the same exceptions
MASKS = ("fixed", "stale")
IGNORES_MU = [name for name, info in ESTIMATOR_INFO.items() if not info.uses_behaviour]


def estimate(tab: Tabular, estimator: str, regime: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_q[gradient of S], E_q[S]), q = pi or mu, as in tests/test_kl_expectations.py."""
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    behaviour = tab.behaviour_logprobs() if regime == "off" else None
    per_sequence = per_token_kl_loss(
        estimator, logp, ref_logp, tab.mask, logits, ref_logits, behaviour_logprobs=behaviour
    ).sum(-1)
    expectation = tab.expect(per_sequence, "mu" if regime == "off" else "pi")
    return tab.grad(expectation), expectation.detach()


@st.composite
def masked_cases(draw, behaviour: bool):
    seed = draw(st.integers(0, 2**31 - 1))
    tab = make_tabular(
        vocab=draw(st.integers(2, 5)),
        length=draw(st.integers(1, 3)),
        seed=seed,
        scale=draw(st.floats(0.3, 3.0)),
        behaviour="random" if behaviour else "none",
    )
    return tab, make_mask(tab, draw(st.sampled_from(MASKS)), seed)


@settings(deadline=None, max_examples=30)
@given(case=masked_cases(behaviour=False))
def test_exact_masked_kl_is_the_analytic_kl_over_allowed_tokens(case):
    """KL(pi^M || pi_ref) over sequences = E_{pi^M}[sum_t KL_t], KL_t = sum_{a in M} pi^M log(pi^M / pi_ref),
    and ``kl_estimators.analytic`` on the -inf-masked logits is that KL_t (values and gradients)."""
    tab, allowed = case
    model = masked_model(tab, allowed)
    logits, ref_logits = model.logits()
    by_hand = model.position_divergences()["reverse"]
    torch.testing.assert_close(analytic(logits, ref_logits), by_hand, **EXACT)
    torch.testing.assert_close(model.expect(by_hand.sum(-1), "pi").detach(), model.reverse_kl().detach(), **EXACT)
    weights = torch.linspace(0.5, 1.5, by_hand.numel(), dtype=torch.float64).reshape(by_hand.shape)
    grads = [torch.autograd.grad((x * weights).sum(), model.table, retain_graph=True)[0] for x in (analytic(logits, ref_logits), by_hand)]
    torch.testing.assert_close(*grads, **EXACT)
    assert (grads[0][~allowed] == 0).all(), "tokens outside the mask get no gradient"


@pytest.mark.parametrize("regime", ["on", "off"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(deadline=None, max_examples=12)
@given(case=masked_cases(behaviour=True))
def test_estimator_claims_hold_for_the_masked_policy(estimator, regime, case):
    """With the masks re-applied (pi^M and mu^M on one support) ``ESTIMATOR_INFO``'s gradient claims
    hold for pi^M: the unbiased estimators are unbiased for grad KL(pi^M || pi_ref). Values claimed
    unbiased equal KL(pi^M || pi_ref), except k3's: E[k3_t] = sum_{a in M} pi_ref(a) - 1 + KL_t, short
    of KL(pi^M || pi_ref) by D = E_{pi^M}[sum_t pi_ref(not M | s_t)] (k3 counts on pi_ref summing to 1
    over pi's support); with k3 in the reward the expected gradient also loses D's score term,
    grad_states D, on top of its unmasked bias (the forward-KL direct term)."""
    tab, allowed = case
    model = masked_model(tab, allowed)
    info = ESTIMATOR_INFO[estimator]
    key = info.on_policy_gradient if regime == "on" else info.off_policy_gradient
    value_unbiased = info.value_unbiased_on_policy if regime == "on" else info.value_unbiased_off_policy
    gradient, value = estimate(model, estimator, regime)
    assert torch.isfinite(gradient).all() and torch.isfinite(value)
    if key is not None:
        expected = model.gradient_quantity(key, "pi" if regime == "on" else "mu")
        if estimator == "k3-reward" and regime == "on":  # k3 in the reward also carries the deficit's score term
            expected = expected - model.grad(reference_mass_outside(model))
        torch.testing.assert_close(gradient, expected, **EXACT)
    if value_unbiased:
        deficit = model.expect(model.position_divergences()["ref_outside"].sum(-1), "pi").detach()
        expected = model.reverse_kl().detach() - (deficit if estimator in K3_VALUES else 0.0)
        torch.testing.assert_close(value, expected, **EXACT)


def reference_mass_outside(model: SupportTabular) -> torch.Tensor:
    """E_{y ~ pi^M}[sum_t pi_ref(not M | s_t)], differentiable through P(y) (the states) only."""
    logp = model.logprobs()[0]
    return (logp.sum(-1).exp() * model.position_divergences()["ref_outside"].sum(-1).detach()).sum()


def test_k3_value_is_biased_low_under_a_mask():
    """The counterexample behind the k3 exception above: a mask that drops reference mass."""
    tab = make_tabular(vocab=3, length=2, seed=0)
    model = masked_model(tab, make_mask(tab, "fixed", 0))
    _, value = estimate(model, "k3-loss", "on")
    assert float(model.reverse_kl().detach() - value) > 1e-2


@pytest.mark.parametrize("estimator", IGNORES_MU)
@settings(deadline=None, max_examples=12)
@given(case=masked_cases(behaviour=False))
def test_framework_style_converges_to_the_off_policy_quantity_at_mu_equal_masked_pi(estimator, case):
    """Sampling with the mask but scoring the unmasked pi is off-policy with mu = sg(pi^M): the
    expected gradient is ``ESTIMATOR_INFO[estimator].off_policy_gradient`` at that mu."""
    tab, allowed = case
    model = framework_model(tab, allowed)
    key = ESTIMATOR_INFO[estimator].off_policy_gradient
    gradient = framework_estimate(model, estimator)
    assert torch.isfinite(gradient).all()
    if key is not None:
        torch.testing.assert_close(gradient, model.gradient_quantity(key, "mu"), **EXACT)


@pytest.mark.parametrize("estimator", IGNORES_MU)
def test_framework_style_is_not_the_masked_kl_gradient(estimator):
    """A counterexample for every estimator: framework-style training (mask at sampling only)
    follows neither grad KL(pi^M || pi_ref) nor grad KL(pi || pi_ref), on fixed cases (V = 3, T = 2)."""
    gaps_masked, gaps_full = [], []
    for seed, kind in itertools.product(range(3), MASKS):
        tab = make_tabular(vocab=3, length=2, seed=seed)
        allowed = make_mask(tab, kind, seed)
        if allowed.all():
            continue
        gradient = framework_estimate(framework_model(tab, allowed), estimator)
        gaps_masked.append(float((gradient - masked_kl_gradient(tab, allowed)).abs().max()))
        gaps_full.append(float((gradient - tab.grad(tab.reverse_kl())).abs().max()))
    assert max(gaps_masked) > 1e-2 and max(gaps_full) > 1e-2


@pytest.mark.parametrize("estimator", ["analytic-future-is", "reinforce-future-is", "k3-ratio", "k3-loss"])
def test_masked_policy_against_an_unmasked_behaviour_is_an_error(estimator):
    """pi^M scored on every sequence an unmasked mu samples: tokens outside M have log pi^M = -inf.
    Each estimator refuses with one line instead of returning NaN."""
    tab = make_tabular(vocab=3, length=2, seed=0, behaviour="random")
    allowed = make_mask(tab, "fixed", 0)
    assert not allowed.all()
    masked = Tabular(tab.table.detach().masked_fill(~allowed, float("-inf")), tab.ref_table, 3, 2, tab.behaviour_table)
    logits, ref_logits = masked.logits()
    logp, ref_logp = masked.logprobs()
    with pytest.raises(ValueError, match="logprobs is -inf at .* generated token"):
        per_token_kl_loss(estimator, logp, ref_logp, masked.mask, logits, ref_logits, behaviour_logprobs=masked.behaviour_logprobs())


@settings(deadline=None, max_examples=30)
@given(case=masked_cases(behaviour=False))
def test_masked_kl_has_a_floor_set_by_the_mask(case):
    """KL_t(pi^M || pi_ref) >= -log pi_ref(M(s_t)) at every position, with equality when pi^M is pi_ref
    restricted to M: a mask that drops reference mass costs KL that no policy update can remove."""
    tab, allowed = case
    model = masked_model(tab, allowed)
    kl = model.position_divergences()["reverse"].detach()
    floor = -torch.log1p(-model.position_divergences()["ref_outside"])
    assert (kl >= floor - 1e-12).all()
    restricted_ref = tab.ref_table.masked_fill(~allowed, float("-inf"))
    at_floor = SupportTabular(restricted_ref, tab.ref_table, tab.vocab, tab.length, allowed=allowed)
    torch.testing.assert_close(at_floor.position_divergences()["reverse"], -torch.log1p(-at_floor.position_divergences()["ref_outside"]), **EXACT)
