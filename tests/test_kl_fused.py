"""``kl_estimators.fused_kl`` and ``LinearLogits`` against the unfused path on materialised logits.

The unfused path (``analytic`` + log-softmax on hidden @ W^T + b) is the reference implementation.
float64: equal up to float64 rounding (rtol 1e-10). float32: compared with the float64 result.
Running ``test_float32_within_the_measured_tolerance_of_float64``'s comparison for seeds 0-19 with
both paths in float32 gave largest abs errors of 9.8e-6 (values) and 2.5e-5 (gradients) fused,
1.0e-5 and 2.4e-5 unfused: the same rounding. The test allows rtol = atol = 1e-4 (4x the worst).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kl_estimators
from kl_estimators import LinearLogits, fused_kl
from kl_estimators.fused import auto_chunk_size

ANALYTIC = ("analytic", "analytic-is", "analytic-future", "analytic-future-is")


def make_case(seed, B, T, V, d, dtype=torch.float64, masked_vocab=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    hp, hq = randn(B, T, d), randn(B, T, d)
    wp, wq = randn(V, d, scale=0.5), randn(V, d, scale=0.5)
    bp = randn(V) if bias else None
    bq = randn(V) if bias else None
    if masked_vocab:  # pi excludes token 0 everywhere; pi_ref excludes token 1 (KL = +inf where pi(1) > 0)
        bp = (bp if bp is not None else torch.zeros(V, dtype=dtype)).clone()
        bq = (bq if bq is not None else torch.zeros(V, dtype=dtype)).clone()
        bp[0] = -torch.inf
        bq[1] = -torch.inf
    tokens = torch.randint(int(masked_vocab), V, (B, T), generator=g)  # sampled tokens have pi > 0
    mask = torch.rand(B, T, generator=g) < 0.7
    for x in (hp, wp) + ((bp,) if bp is not None else ()):
        x.requires_grad_(True)
    return hp, wp, bp, hq, wq, bq, tokens, mask


def unfused(hp, wp, bp, hq, wq, bq, tokens, mask, tau=1.0):
    """The reference implementation: materialised logits, ``analytic`` and log-softmax."""
    zp = (hp @ wp.T + (0 if bp is None else bp)) / tau
    zq = ((hq @ wq.T + (0 if bq is None else bq)) / tau).detach()
    kl = kl_estimators.analytic(zp, zq, mask=mask)
    logp, logq = zp.log_softmax(-1), zq.log_softmax(-1)
    logp_y = torch.where(mask, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 0.0)
    logq_y = torch.where(mask, logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 0.0)
    plogp = logp.exp() * torch.where(torch.isneginf(logp), 0.0, logp)  # 0 log 0 = 0, no NaN in backward
    entropy = torch.where(mask, -plogp.sum(-1), 0.0)
    return kl, logp_y, logq_y, entropy


def fused(hp, wp, bp, hq, wq, bq, tokens, mask, tau=1.0, chunk_size=None):
    out = fused_kl(LinearLogits(hp, wp, bp, tau), LinearLogits(hq, wq, bq, tau), tokens, mask, chunk_size)
    return out.kl, out.logprobs, out.ref_logprobs, out.entropy


def loss_of(outputs, seed):
    """A random linear combination of the four outputs (finite KL entries only)."""
    g = torch.Generator().manual_seed(seed + 1)
    kl, logp, _, entropy = outputs
    kl = torch.where(torch.isfinite(kl), kl, 0.0)
    weights = [torch.randn(kl.shape, generator=g, dtype=torch.float64).to(kl.dtype) for _ in range(3)]
    return (weights[0] * kl + weights[1] * logp + weights[2] * entropy).sum()


def values_and_grads(path, case, seed, **kwargs):
    outputs = path(*case, **kwargs)
    inputs = [x for x in case[:3] if x is not None]
    grads = torch.autograd.grad(loss_of(outputs, seed), inputs)
    return [o.detach() for o in outputs], list(grads)


def assert_all_close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 10**6),
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    V=st.integers(2, 40),
    d=st.integers(1, 8),
    tau=st.sampled_from([1.0, 0.7, 1.5]),
    chunk_size=st.sampled_from([None, 1, 2, 3, 7]),
    masked_vocab=st.booleans(),
    bias=st.booleans(),
)
def test_float64_values_and_gradients_equal_the_unfused_path(seed, B, T, V, d, tau, chunk_size, masked_vocab, bias):
    case = make_case(seed, B, T, V, d, masked_vocab=masked_vocab, bias=bias or masked_vocab)
    expected = values_and_grads(unfused, case, seed, tau=tau)
    got = values_and_grads(fused, case, seed, tau=tau, chunk_size=chunk_size)
    assert_all_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    assert_all_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


def test_masked_vocabulary_gives_infinite_kl_with_zero_gradient():
    case = make_case(3, 2, 4, 6, 3, masked_vocab=True)
    kl, logp, _, _ = fused(*case)
    mask = case[-1]
    assert torch.isinf(kl[mask]).all()  # pi_ref excludes token 1, pi does not
    assert (kl[~mask] == 0).all() and (logp[~mask] == 0).all()
    expected = values_and_grads(unfused, case, 3)
    assert_all_close(values_and_grads(fused, case, 3)[1], expected[1], rtol=1e-10, atol=1e-12)


def test_tied_weights_gradient_through_embedding_and_output_layer():
    """hidden = tanh(E[ids] A) and the output layer is E itself: dE sums both uses, as unfused."""
    g = torch.Generator().manual_seed(0)
    V, d, B, T = 30, 6, 2, 5
    embedding = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    mixer = torch.randn(d, d, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    ref_embedding = torch.randn(V, d, generator=g, dtype=torch.float64)
    hq = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    grads = []
    for path in (unfused, fused):
        hp = torch.tanh(embedding[ids] @ mixer)
        outputs = path(hp, embedding, None, hq, ref_embedding, None, ids, mask)
        grads.append(torch.autograd.grad(loss_of(outputs, 0), (embedding, mixer)))
    assert_all_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_reference_gets_no_gradient_even_when_it_shares_the_weight():
    case = list(make_case(1, 2, 3, 10, 4))
    hq = case[3].clone().requires_grad_(True)
    case[3], case[4] = hq, case[1]  # the reference uses the policy's output weight (LoRA-style sharing)
    kl, logp, logq, _ = fused(*case)
    assert not logq.requires_grad
    (kl.sum() + logp.sum()).backward()
    assert hq.grad is None
    expected_w = torch.autograd.grad(loss_of(unfused(*case), 0), case[1])[0]
    got_w = torch.autograd.grad(loss_of(fused(*case), 0), case[1])[0]
    torch.testing.assert_close(got_w, expected_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_float32_within_the_measured_tolerance_of_float64(seed):
    case64 = make_case(seed, 3, 7, 500, 64, masked_vocab=seed % 2 == 1)
    case32 = [None if x is None else x.detach().float().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in case64]
    truth = values_and_grads(unfused, case64, seed, tau=0.8)
    got = values_and_grads(fused, case32, seed, tau=0.8, chunk_size=5)
    assert got[0][0].dtype == torch.float32
    assert_all_close([x.double() for x in got[0]], truth[0], rtol=1e-4, atol=1e-4)
    assert_all_close([x.double() for x in got[1]], truth[1], rtol=1e-4, atol=1e-4)


def test_half_inputs_are_computed_in_float32():
    case = [None if x is None else x.detach().bfloat16() if x.is_floating_point() else x for x in make_case(0, 2, 3, 20, 4)]
    out = fused_kl(LinearLogits(*case[:3]), LinearLogits(*case[3:6]), case[6], case[7])
    assert out.kl.dtype == torch.float32 and out.logprobs.dtype == torch.float32


def bf16_case(seed: int, chunk_size: int | None):
    """A float32 case (V 300, d 32) with products in bfloat16 for both models."""
    case = [None if x is None else x.detach().float().requires_grad_(x.requires_grad) if x.is_floating_point() else x
            for x in make_case(seed, 2, 5, 300, 32)]
    hp, wp, bp, hq, wq, bq, tokens, mask = case
    policy = LinearLogits(hp, wp, bp, 0.9, product_dtype=torch.bfloat16)
    reference = LinearLogits(hq, wq, bq, 0.9, product_dtype=torch.bfloat16)
    return case, policy, reference, tokens, mask


def materialised_path(policy: LinearLogits, reference: LinearLogits, tokens, mask):
    """``unfused`` on the logits ``materialise`` gives (products in their ``product_dtype``)."""
    zp, zq = policy.materialise(), reference.materialise().detach()
    kl = kl_estimators.analytic(zp, zq, mask=mask)
    logp, logq = zp.log_softmax(-1), zq.log_softmax(-1)
    logp_y = torch.where(mask, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 0.0)
    logq_y = torch.where(mask, logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
    return kl, logp_y, logq_y, entropy


@pytest.mark.parametrize("seed", range(3))
def test_bfloat16_products_equal_the_materialised_bfloat16_logits(seed):
    """Values: the same bfloat16 logits, so float32 rounding apart; gradients: both paths run their
    backward products in bfloat16, so they agree to bfloat16's resolution (2^-8 relative), and dW,
    one chunk's product here in both, much closer: seeds 0-5 gave at most 5e-5 relative, and
    float32 backward products 2.6e-3 to 3.5e-3 (dh: 1.3e-3 and 3.5e-3; rounding flips of dz to
    bfloat16 blur it)."""
    case, policy, reference, tokens, mask = bf16_case(seed, None)
    inputs = [x for x in case[:3] if x is not None]
    fused_out = fused_kl(policy, reference, tokens, mask, chunk_size=64)
    got = [fused_out.kl, fused_out.logprobs, fused_out.ref_logprobs, fused_out.entropy]
    expected = materialised_path(policy, reference, tokens, mask)
    assert_all_close([x.detach() for x in got], [x.detach() for x in expected], rtol=3e-5, atol=3e-5)
    got_grads = torch.autograd.grad(loss_of(got, seed), inputs)
    expected_grads = torch.autograd.grad(loss_of(expected, seed), inputs)
    for g, e, tolerance in zip(got_grads, expected_grads, (1e-2, 5e-4, 1e-2), strict=True):  # dh, dW, db
        assert float((g - e).norm() / e.norm()) < tolerance
    float32_kl = fused_kl(dataclasses.replace(policy, product_dtype=None), dataclasses.replace(reference, product_dtype=None),
                          tokens, mask).kl
    assert float((float32_kl - fused_out.kl).abs().max()) > 1e-4  # the products really ran in bfloat16


def test_bfloat16_products_do_not_depend_on_the_chunk_size():
    case, policy, reference, tokens, mask = bf16_case(7, None)
    inputs = [x for x in case[:3] if x is not None]
    results = []
    for chunk_size in (64, 3):
        out = fused_kl(policy, reference, tokens, mask, chunk_size=chunk_size)
        outputs = [out.kl, out.logprobs, out.ref_logprobs, out.entropy]
        results.append(([x.detach() for x in outputs], torch.autograd.grad(loss_of(outputs, 7), inputs)))
    assert_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for g, e in zip(results[1][1], results[0][1], strict=True):  # dW: chunks' bfloat16 products summed in float32
        assert float((g - e).norm() / e.norm()) < 1e-2


@pytest.mark.parametrize("estimator", ANALYTIC)
def test_every_analytic_estimator_takes_linear_logits_in_place_of_logits(estimator):
    hp, wp, bp, hq, wq, bq, tokens, mask = make_case(7, 3, 6, 25, 5)
    behaviour = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 3
    results = []
    for form in ("tensor", "linear", "kl"):
        zp, zq = hp @ wp.T + bp, (hq @ wq.T + bq)
        logprobs = zp.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        ref_logprobs = zq.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if form == "tensor":
            inputs = {"logits": zp, "ref_logits": zq}
        elif form == "linear":
            inputs = {"logits": LinearLogits(hp, wp, bp), "ref_logits": LinearLogits(hq, wq, bq)}
        else:
            out = fused_kl(LinearLogits(hp, wp, bp), LinearLogits(hq, wq, bq), tokens, mask)
            inputs, logprobs = {"kl": out.kl}, torch.where(mask, out.logprobs, logprobs.detach())
        behaviour_logprobs = behaviour if estimator.endswith("-is") else None
        loss = kl_estimators.sequence_kl_loss(
            estimator, logprobs, ref_logprobs, mask, behaviour_logprobs=behaviour_logprobs, chunk_size=4, **inputs
        )
        results.append((loss.detach(), torch.autograd.grad(loss, (hp, wp, bp))))
    for value, grads in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-10, atol=1e-12)
        assert_all_close(grads, results[0][1], rtol=1e-10, atol=1e-12)


def test_analytic_takes_linear_logits():
    hp, wp, bp, hq, wq, bq, _, mask = make_case(2, 2, 3, 12, 4)
    got = kl_estimators.analytic(LinearLogits(hp, wp, bp), LinearLogits(hq, wq, bq), mask=mask)
    expected = kl_estimators.analytic(hp @ wp.T + bp, hq @ wq.T + bq, mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_without_reference_only_logprobs_and_entropy():
    hp, wp, bp, _, _, _, tokens, mask = make_case(4, 2, 3, 12, 4)
    out = fused_kl(LinearLogits(hp, wp, bp), None, tokens, mask)
    assert (out.kl == 0).all() and (out.ref_logprobs == 0).all()
    zp = hp @ wp.T + bp
    expected = torch.where(mask, zp.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 0.0)
    torch.testing.assert_close(out.logprobs, expected, rtol=1e-10, atol=1e-12)


def test_auto_chunk_size_bounds_the_block():
    assert auto_chunk_size(151_936) * 151_936 <= 2**24 and auto_chunk_size(10**9) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "weight": torch.zeros(5, 3)}, "weight must be"),
        (lambda c: {**c, "hidden": torch.zeros(2, 4)}, "hidden must be"),
        (lambda c: {**c, "bias": torch.zeros(4)}, "bias must be"),
        (lambda c: {**c, "temperature": 0.0}, "temperature must be"),
        (lambda c: {**c, "product_dtype": torch.int32}, "product_dtype must be"),
    ],
)
def test_bad_linear_logits_are_rejected(change, message):
    fields = {"hidden": torch.zeros(2, 3, 4), "weight": torch.zeros(5, 4), "bias": None, "temperature": 1.0}
    with pytest.raises(ValueError, match=message):
        LinearLogits(**change(fields))


def test_bad_fused_inputs_are_rejected():
    policy = LinearLogits(torch.zeros(2, 3, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="tokens must be"):
        fused_kl(policy, None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 5\)"):
        fused_kl(policy, None, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="reference logits must have"):
        fused_kl(policy, LinearLogits(torch.zeros(2, 3, 4), torch.zeros(6, 4)))
    with pytest.raises(ValueError, match="mask must be"):
        fused_kl(policy, None, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="both be tensors or both be LinearLogits"):
        kl_estimators.analytic(policy, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="either kl or logits"):
        kl_estimators.per_token_kl_loss(
            "analytic", torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool),
            logits=policy, ref_logits=policy, kl=torch.zeros(2, 3),
        )


def test_fully_masked_batch_gives_zeros_and_no_gradient():
    hp, wp, bp, hq, wq, bq, tokens, _ = make_case(5, 2, 3, 12, 4)
    out = fused_kl(LinearLogits(hp, wp, bp), LinearLogits(hq, wq, bq), tokens, torch.zeros(2, 3, dtype=torch.bool))
    assert all((x == 0).all() for x in out)
    grads = torch.autograd.grad(out.kl.sum() + out.logprobs.sum(), (hp, wp, bp), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)
