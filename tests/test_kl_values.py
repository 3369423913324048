"""Laws of the KL values: k1/k2/k3 per-token estimates and the exact analytic KL."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_estimators import analytic, k1, k2, k3

INF = math.inf
EXACT = dict(rtol=1e-10, atol=1e-12)


@st.composite
def logit_pairs(draw, low: float = -20.0, high: float = 20.0, dtype=torch.float64):
    """Two [R, V] logit tensors, R in 1..4, V in 2..6."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    values = st.lists(st.floats(low, high), min_size=rows * vocab, max_size=rows * vocab)
    return tuple(torch.tensor(draw(values), dtype=dtype).reshape(rows, vocab) for _ in range(2))


@st.composite
def masked_vocab_pairs(draw):
    """[R, V] logit pairs with random -inf entries; every row keeps a finite entry (column 0)."""
    lp, lq = draw(logit_pairs())
    drop_p = torch.tensor(draw(st.lists(st.booleans(), min_size=lp.numel(), max_size=lp.numel())))
    drop_q = torch.tensor(draw(st.lists(st.booleans(), min_size=lq.numel(), max_size=lq.numel())))
    drop_p, drop_q = drop_p.reshape(lp.shape), drop_q.reshape(lq.shape)
    drop_p[:, 0] = drop_q[:, 0] = False
    return torch.where(drop_p, -INF, lp), torch.where(drop_q, -INF, lq)


def _reference_kl(lp_row: list[float], lq_row: list[float]) -> float:
    """KL(softmax(lp) || softmax(lq)) in plain Python with the 0 log 0 = 0 convention."""

    def log_softmax(row):
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row if x != -INF))
        return [x - log_z for x in row]

    logp, logq = log_softmax(lp_row), log_softmax(lq_row)
    total = 0.0
    for a, b in zip(logp, logq):
        if a == -INF:
            continue
        if b == -INF:
            return INF
        total += math.exp(a) * (a - b)
    return total


@settings(deadline=None, max_examples=100)
@given(pair=logit_pairs())
def test_k1_and_k3_are_unbiased_for_analytic_kl(pair):
    lp, lq = pair
    logp, logq = lp.log_softmax(-1), lq.log_softmax(-1)
    p = logp.exp()
    kl = analytic(lp, lq)
    torch.testing.assert_close((p * k1(logp, logq)).sum(-1), kl, **EXACT)
    torch.testing.assert_close((p * k3(logp, logq)).sum(-1), kl, rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=100)
@given(pair=logit_pairs())
def test_analytic_matches_reference(pair):
    lp, lq = pair
    expected = torch.tensor([_reference_kl(a, b) for a, b in zip(lp.tolist(), lq.tolist())], dtype=lp.dtype)
    torch.testing.assert_close(analytic(lp, lq), expected, rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=100)
@given(pair=logit_pairs(low=-50.0, high=0.0))
def test_k2_k3_analytic_are_non_negative(pair):
    logp, logq = pair
    assert (k2(logp, logq) >= 0).all()
    assert (k3(logp, logq) >= 0).all()
    assert (analytic(logp, logq) >= -1e-12).all()


@settings(deadline=None, max_examples=100)
@given(pair=logit_pairs(), shift=st.floats(-100, 100))
def test_all_are_zero_when_p_equals_q(pair, shift):
    logits, _ = pair
    logp = logits.log_softmax(-1)
    for estimate in (k1, k2, k3):
        assert (estimate(logp, logp) == 0).all()
    torch.testing.assert_close(analytic(logits, logits + shift), torch.zeros(len(logits), dtype=logits.dtype), **EXACT)


@settings(deadline=None, max_examples=100)
@given(pair=logit_pairs(), shifts=st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)))
def test_analytic_is_shift_invariant(pair, shifts):
    lp, lq = pair
    torch.testing.assert_close(analytic(lp + shifts[0], lq + shifts[1]), analytic(lp, lq), rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=100)
@given(pair=masked_vocab_pairs())
def test_analytic_with_masked_vocabulary(pair):
    lp, lq = pair
    lp, lq = lp.requires_grad_(), lq.requires_grad_()
    kl = analytic(lp, lq)
    expected = torch.tensor([_reference_kl(a, b) for a, b in zip(lp.tolist(), lq.tolist())], dtype=lp.dtype)
    torch.testing.assert_close(kl, expected, rtol=1e-9, atol=1e-9)
    assert not kl.isnan().any()
    finite = kl.isfinite()
    grad_p, grad_q = torch.autograd.grad(kl[finite].sum(), (lp, lq), allow_unused=True, materialize_grads=True)
    assert grad_p.isfinite().all() and grad_q.isfinite().all()
    logp, logq = lp.detach().log_softmax(-1), lq.detach().log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    centred = torch.where(p > 0, logp - logq - kl.detach().unsqueeze(-1), 0.0)
    torch.testing.assert_close(grad_p[finite], (p * centred)[finite], **EXACT)
    torch.testing.assert_close(grad_q[finite], (q - p)[finite], **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_analytic_extreme_logits(dtype, chunk_size):
    lp = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [0.0, -INF, 0.0], [0.0, -INF, 0.0], [0.0, -INF, 0.0]])
    lq = torch.tensor([[0.0, 0.0, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, -INF], [0.0, -INF, 3.0], [0.0, 0.0, 0.0]])
    lp, lq = lp.to(dtype).requires_grad_(), lq.to(dtype).requires_grad_()
    kl = analytic(lp, lq, chunk_size=chunk_size)
    log_q3 = torch.tensor([0.0, -INF, 3.0]).log_softmax(-1)
    row3 = 0.5 * (math.log(0.5) - log_q3[0].item()) + 0.5 * (math.log(0.5) - log_q3[2].item())
    expected = torch.tensor([math.log(3), 2e4, INF, row3, math.log(1.5)])
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(kl, (lp, lq), grad_outputs=torch.ones_like(kl))
    assert all(g.isfinite().all() for g in grads)
    torch.testing.assert_close(grads[1][0].float(), torch.tensor([-2 / 3, 1 / 3, 1 / 3]), rtol=1e-3, atol=1e-3)


def _lead_with_dim(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    vocab = draw(st.integers(2, 6))
    dim = draw(st.integers(0, len(shape)))
    full = list(shape)
    full.insert(dim, vocab)
    return full, dim


@settings(deadline=None, max_examples=100)
@given(data=st.data(), chunk_size=st.integers(1, 7), use_mask=st.booleans())
def test_chunked_matches_unchunked(data, chunk_size, use_mask):
    full, dim = _lead_with_dim(data.draw)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    lp = torch.randn(full, generator=gen, dtype=torch.float64) * 3
    lq = torch.randn(full, generator=gen, dtype=torch.float64) * 3
    lp = torch.where(torch.rand(full, generator=gen) < 0.2, -INF, lp)
    lq = torch.where(torch.rand(full, generator=gen) < 0.2, -INF, lq)
    lp.select(dim, 0).fill_(0.0)
    lq.select(dim, 0).fill_(0.0)
    lp, lq = lp.requires_grad_(), lq.requires_grad_()
    lead = lp.movedim(dim, -1).shape[:-1]
    mask = torch.rand(lead, generator=gen) < 0.7 if use_mask else None
    plain = analytic(lp, lq, dim=dim, mask=mask)
    chunked = analytic(lp, lq, dim=dim, mask=mask, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, plain, **EXACT)
    upstream = torch.randn(lead, generator=gen, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(chunked, (lp, lq), upstream), torch.autograd.grad(plain, (lp, lq), upstream)
    ):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("fn", [k1, k2, k3, analytic])
def test_mask_zeroes_result_and_gradient(fn):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=gen, requires_grad=True)
    b = torch.randn(3, 4, generator=gen)
    lead = (3,) if fn is analytic else (3, 4)
    mask = torch.rand(lead, generator=gen) < 0.5
    mask.view(-1)[:2] = torch.tensor([True, False])
    out = fn(a, b, mask=mask)
    torch.testing.assert_close(out, torch.where(mask, fn(a, b), 0.0))
    (grad,) = torch.autograd.grad(out.sum(), a)
    grad_mask = mask.unsqueeze(-1).expand_as(a) if fn is analytic else mask
    assert (grad[~grad_mask] == 0).all() and (grad[grad_mask] != 0).any()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@settings(deadline=None, max_examples=20)
@given(pair=logit_pairs(low=-10.0, high=10.0, dtype=torch.float32))
def test_half_inputs_compute_in_float32(half, pair):
    lp, lq = (x.to(half).float() for x in pair)
    for fn in (k1, k2, k3, analytic):
        out = fn(lp.to(half), lq.to(half))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(lp, lq), rtol=1e-5, atol=1e-5)
    chunked = analytic(lp.to(half), lq.to(half), chunk_size=2)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, analytic(lp, lq), rtol=1e-5, atol=1e-5)
    loose = 0.05 if half == torch.float16 else 0.5
    torch.testing.assert_close(analytic(pair[0].to(half), pair[1].to(half)), analytic(*pair), rtol=0.05, atol=loose)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: k1(torch.zeros(3), torch.zeros(4)), "logq"),
        (lambda: k3(torch.zeros(3), torch.zeros(1)), "logq"),
        (lambda: k2(torch.zeros(3), torch.zeros(3), mask=torch.ones(2, dtype=torch.bool)), "mask"),
        (lambda: k2(torch.zeros(3), torch.zeros(3), mask=torch.ones(3)), "mask"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 4)), "logits_q"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(1, 3)), "logits_q"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2, 1, dtype=torch.bool)), "mask"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=0), "chunk_size"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=-4), "chunk_size"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=2.5), "chunk_size"),
        (lambda: analytic(torch.zeros(2, 3), torch.zeros(2, 3), dim=2), "dim"),
        (lambda: analytic(torch.zeros(()), torch.zeros(())), "logits_p"),
    ],
)
def test_bad_inputs_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()
