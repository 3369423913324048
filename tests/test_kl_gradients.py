"""Input handling of the KL-gradient estimators: masks, padding, constants, chunking, bad input.

What each estimator's gradient equals in expectation is proven in ``test_kl_expectations.py``.
"""

from __future__ import annotations

import pytest
import torch

from kl_estimators import ESTIMATORS, per_token_kl_loss, sequence_kl_loss


def _padded_batch(garbage: float) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """A [3, 4, 5] batch of lengths 4, 2, 1 sampled by a behaviour policy mu; padded entries of
    every input hold ``garbage``."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(4) < torch.tensor([[4], [2], [1]])
    leaf = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    behaviour_logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (3, 4, 1), generator=gen)
    logits = torch.where(mask.unsqueeze(-1), leaf, garbage)
    ref_logits = torch.where(mask.unsqueeze(-1), ref_logits, garbage)

    def sampled(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.log_softmax(-1).gather(-1, tokens).squeeze(-1), garbage)

    inputs = dict(
        logprobs=sampled(logits),
        ref_logprobs=sampled(ref_logits),
        mask=mask,
        logits=logits,
        ref_logits=ref_logits,
        behaviour_logprobs=sampled(behaviour_logits),
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
    assert grad[mask].abs().sum() > 0
    assert (per_token_kl_loss(estimator, **inputs)[~mask] == 0).all()


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("garbage", [7.0, float("nan")])
def test_importance_weights_ignore_padding(importance, garbage):
    leaf, inputs, mask = _padded_batch(garbage)
    clean_leaf, clean_inputs, _ = _padded_batch(0.0)
    options = dict(importance=importance, weight_clip=(0.2, 3.0))
    loss, clean_loss = (sequence_kl_loss("k3-loss", **x, **options) for x in (inputs, clean_inputs))
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(clean_loss, clean_leaf)[0])


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_padding_does_not_leak(estimator, garbage):
    leaf, inputs, _ = _padded_batch(garbage)
    clean_leaf, clean_inputs, _ = _padded_batch(0.0)
    loss, clean_loss = (sequence_kl_loss(estimator, **x) for x in (inputs, clean_inputs))
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(clean_loss, clean_leaf)[0])


def test_ref_and_behaviour_inputs_get_no_gradient():
    _, inputs, _ = _padded_batch(0.0)
    constants = {k: inputs[k].detach().requires_grad_() for k in ("ref_logprobs", "ref_logits", "behaviour_logprobs")}
    for estimator in ESTIMATORS:
        loss = sequence_kl_loss(estimator, **{**inputs, **constants})
        grads = torch.autograd.grad(loss, tuple(constants.values()), allow_unused=True)
        assert all(g is None for g in grads), estimator


def test_chunked_analytic_estimators_agree():
    leaf, inputs, _ = _padded_batch(0.0)
    for estimator in ("analytic", "analytic-is", "analytic-future", "analytic-future-is"):
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
        (dict(behaviour_logprobs=torch.zeros(3, 5)), "behaviour_logprobs"),
        (dict(importance="prefix"), "importance"),
        (dict(estimator="k3-ratio", importance="token"), "importance"),
        (dict(estimator="analytic-future-is", importance="sequence"), "importance"),
        (dict(weight_clip=0.0), "weight_clip"),
        (dict(weight_clip=-1.0), "weight_clip"),
        (dict(weight_clip=float("nan")), "weight_clip"),
        (dict(weight_clip=True), "weight_clip"),
        (dict(weight_clip=(2.0, 1.0)), "weight_clip"),
        (dict(weight_clip=(-1.0, 1.0)), "weight_clip"),
        (dict(weight_clip=(0.0, 0.0)), "weight_clip"),
        (dict(weight_clip=[0.5, 2.0]), "weight_clip"),
    ],
)
def test_bad_inputs_raise(changes, name):
    with pytest.raises(ValueError, match=name):
        sequence_kl_loss(**_bad(**changes))
