"""Exact expectations of every KL-gradient estimator on tabular policies (enumeration, float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from kl_estimators import ESTIMATORS, sequence_kl_loss
from tabular import Tabular, make_tabular, tabulars

UNBIASED = ("reinforce", "reinforce-future", "analytic-future")
EXACT = dict(rtol=1e-9, atol=1e-11)


def _weight_rows(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Equal to ``x`` in value (x finite); the gradient reaching row i is scaled by weights[i]."""
    w = weights.reshape(-1, *[1] * (x.dim() - 1))
    return x.detach() + w * (x - x.detach())


def expected_estimator_grad(tab: Tabular, estimator: str) -> torch.Tensor:
    """sum_y P(y) * grad(surrogate of the batch holding only y), P(y) held constant.

    All V^T sequences go in one batch; the loss is a batch mean, so each row's gradient is
    scaled by N * P(y).
    """
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    weights = len(logp) * tab.sequence_probs().detach()
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss = sequence_kl_loss(
        estimator, _weight_rows(logp, weights), ref_logp, mask, _weight_rows(logits, weights), ref_logits
    )
    return tab.grad(loss)


@pytest.mark.parametrize("estimator", UNBIASED)
@settings(deadline=None, max_examples=60)
@given(tab=tabulars())
def test_unbiased_estimators_match_exact_gradient(estimator, tab):
    torch.testing.assert_close(expected_estimator_grad(tab, estimator), tab.grad(tab.reverse_kl()), **EXACT)


@settings(deadline=None, max_examples=60)
@given(tab=tabulars())
def test_k1_loss_gradient_has_zero_mean(tab):
    expected = expected_estimator_grad(tab, "k1-loss")
    torch.testing.assert_close(expected, torch.zeros_like(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["analytic", "k2-loss"])
@settings(deadline=None, max_examples=60)
@given(tab=tabulars(max_length=1))
def test_single_step_estimators_match_reverse_kl_gradient(estimator, tab):
    torch.testing.assert_close(expected_estimator_grad(tab, estimator), tab.grad(tab.reverse_kl()), **EXACT)


@settings(deadline=None, max_examples=60)
@given(tab=tabulars(max_length=1))
def test_k3_loss_single_step_is_forward_kl_gradient(tab):
    torch.testing.assert_close(expected_estimator_grad(tab, "k3-loss"), tab.grad(tab.forward_kl()), **EXACT)


def test_k3_loss_is_not_the_reverse_kl_gradient():
    tab = make_tabular(vocab=3, length=1, seed=0)
    gap = expected_estimator_grad(tab, "k3-loss") - tab.grad(tab.reverse_kl())
    assert gap.abs().max() > 1e-2


@pytest.mark.parametrize("estimator", ["analytic", "k2-loss"])
def test_myopic_estimators_are_biased_for_longer_sequences(estimator):
    tab = make_tabular(vocab=3, length=3, seed=0)
    gap = expected_estimator_grad(tab, estimator) - tab.grad(tab.reverse_kl())
    assert gap.abs().max() > 1e-2


def _padded_batch(garbage: float) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """A [3, 4, 5] batch of lengths 4, 2, 1; padded entries of every input hold ``garbage``."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(4) < torch.tensor([[4], [2], [1]])
    leaf = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (3, 4, 1), generator=gen)
    logits = torch.where(mask.unsqueeze(-1), leaf, garbage)
    ref_logits = torch.where(mask.unsqueeze(-1), ref_logits, garbage)
    inputs = dict(
        logprobs=torch.where(mask, logits.log_softmax(-1).gather(-1, tokens).squeeze(-1), garbage),
        ref_logprobs=torch.where(mask, ref_logits.log_softmax(-1).gather(-1, tokens).squeeze(-1), garbage),
        mask=mask,
        logits=logits,
        ref_logits=ref_logits,
    )
    return leaf, inputs, mask


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_positions_contribute_nothing(estimator):
    leaf, inputs, mask = _padded_batch(garbage=7.0)
    loss = sequence_kl_loss(estimator, **inputs)
    lengths = mask.sum(-1).tolist()
    truncated = torch.stack([
        sequence_kl_loss(estimator, **{k: v[b : b + 1, :n] for k, v in inputs.items()})
        for b, n in enumerate(lengths)
    ]).mean()
    grad, truncated_grad = (torch.autograd.grad(x, leaf, retain_graph=True)[0] for x in (loss, truncated))
    torch.testing.assert_close(loss, truncated)
    torch.testing.assert_close(grad, truncated_grad)
    assert (grad[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0 or estimator == "k1-loss"


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_padding_does_not_leak(estimator, garbage):
    leaf, inputs, _ = _padded_batch(garbage)
    clean_leaf, clean_inputs, _ = _padded_batch(0.0)
    loss, clean_loss = (sequence_kl_loss(estimator, **x) for x in (inputs, clean_inputs))
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(clean_loss, clean_leaf)[0])


def test_ref_inputs_get_no_gradient():
    _, inputs, _ = _padded_batch(0.0)
    ref_logprobs = inputs["ref_logprobs"].detach().requires_grad_()
    ref_logits = inputs["ref_logits"].detach().requires_grad_()
    for estimator in ESTIMATORS:
        loss = sequence_kl_loss(estimator, **{**inputs, "ref_logprobs": ref_logprobs, "ref_logits": ref_logits})
        grads = torch.autograd.grad(loss, (ref_logprobs, ref_logits), allow_unused=True)
        assert all(g is None for g in grads), estimator


def test_chunked_analytic_estimators_agree():
    leaf, inputs, _ = _padded_batch(0.0)
    for estimator in ("analytic", "analytic-future"):
        plain = sequence_kl_loss(estimator, **inputs)
        chunked = sequence_kl_loss(estimator, **inputs, chunk_size=5)
        torch.testing.assert_close(chunked, plain)
        grads = (torch.autograd.grad(x, leaf, retain_graph=True)[0] for x in (chunked, plain))
        torch.testing.assert_close(*grads)


def _bad(**changes) -> dict:
    _, inputs, _ = _padded_batch(0.0)
    return {"estimator": "analytic-future", **inputs, **changes}


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        (dict(estimator="k4-loss"), "estimator"),
        (dict(estimator="unknown"), "reinforce-future"),
        (dict(logprobs=torch.zeros(3, 4, 1)), "logprobs"),
        (dict(ref_logprobs=torch.zeros(3, 3)), "ref_logprobs"),
        (dict(ref_logprobs=torch.zeros(1, 4)), "ref_logprobs"),
        (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(3, 4)), "mask"),
        (dict(mask=None), "mask"),
        (dict(logits=None), "logits"),
        (dict(ref_logits=None), "ref_logits"),
        (dict(logits=torch.zeros(3, 5, 5)), "logits"),
        (dict(logits=torch.zeros(3, 4)), "logits"),
        (dict(ref_logits=torch.zeros(3, 4, 6)), "ref_logits"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_inputs_raise(changes, name):
    with pytest.raises(ValueError, match=name):
        sequence_kl_loss(**_bad(**changes))
