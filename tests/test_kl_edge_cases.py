"""``kl_estimators`` at the edges: an empty batch, and importance weights whose log-ratio
overflows float32 (clipped weights stay exact and finite; unclipped ones warn)."""
from __future__ import annotations

import warnings

import pytest
import torch

from kl_estimators import sequence_kl_loss
from kl_estimators.gradients import ESTIMATORS
from kl_estimators.weights import weight

ANALYTIC = {"analytic", "analytic-is", "analytic-future", "analytic-future-is"}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_batch_gives_zero_not_nan(estimator):
    B, T, V = 0, 4, 5
    logits = torch.zeros(B, T, V, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)[..., 0]
    kwargs = {"logits": logits, "ref_logits": torch.zeros(B, T, V)} if estimator in ANALYTIC else {}
    loss = sequence_kl_loss(estimator, logprobs, torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool), **kwargs)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.numel() == 0


@pytest.mark.parametrize("clip", [2.0, (0.5, 2.0), 1e30])
def test_clipped_weights_are_exact_and_finite_for_huge_log_ratios(clip):
    log_w = torch.tensor([-200.0, -1.0, 0.0, 0.5, 1.0, 88.0, 89.0, 1e4])
    got = weight(log_w, clip, differentiable=False)
    low, high = clip if isinstance(clip, tuple) else (0.0, clip)
    expected = log_w.double().exp().clamp(low, high).float()  # float64 does not overflow below 709
    expected[-1] = high
    assert torch.isfinite(got).all() and torch.equal(got, expected)


def test_unclipped_overflow_warns():
    with pytest.warns(RuntimeWarning, match="weight_clip"):
        assert torch.isinf(weight(torch.tensor([0.0, 100.0]), None, differentiable=False)).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight(torch.tensor([0.0, 80.0]), None, differentiable=False)


def test_overflowed_prefix_weight_after_a_sequence_end_is_not_nan():
    """A prefix log-ratio above 88 makes later weights inf; positions after the end (mask False)
    used to give inf x 0 = NaN in analytic-is. Now the masked tail adds 0: unclipped, the loss is
    inf (with a warning), never NaN; clipped, it is finite."""
    T, V = 4, 3
    logits = torch.zeros(1, T, V)
    logprobs = torch.log_softmax(logits, -1)[..., 0]
    behaviour = logprobs - torch.tensor([[100.0, 0.0, 0.0, 0.0]])  # mu far less likely than pi
    mask = torch.tensor([[True, True, False, False]])
    ref_logits = logits + torch.tensor([0.0, 1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="overflow"):
        loss = sequence_kl_loss("analytic-is", logprobs, logprobs, mask, logits=logits, ref_logits=ref_logits, behaviour_logprobs=behaviour)
    assert torch.isinf(loss)
    clipped = sequence_kl_loss("analytic-is", logprobs, logprobs, mask, logits=logits, ref_logits=ref_logits, behaviour_logprobs=behaviour, weight_clip=10.0)
    assert torch.isfinite(clipped)
