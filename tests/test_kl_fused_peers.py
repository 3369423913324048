"""``kl_estimators.fused_kl`` computes the divergence of TRL 1.16's chunked kernel with beta = 1.

TRL's ``trl/kernels/chunked_divergence.py`` (``ChunkedDivergenceFunction``; its pure-torch tile
path off CUDA/XPU) returns, per token, KL(student || teacher) for ``beta=1.0`` from the hidden
states and LM heads of both models, with the gradient reaching the student only. The two fused
kernels and the KL of the materialised logits must agree on the value and on the gradient with
respect to the policy's hidden states and weight (bench/bench_fused.py times them side by side).
Liger-Kernel's ``LigerFusedLinearJSD`` is Triton-only, so it cannot run without a GPU here.
"""
from __future__ import annotations

import pytest
import torch

from kl_estimators import LinearLogits, analytic, fused_kl

chunked_divergence = pytest.importorskip("trl.kernels.chunked_divergence")


def inputs(vocab: int, dim: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hp, hq = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    wp, wq = torch.randn(vocab, dim, generator=g) * dim**-0.5, torch.randn(vocab, dim, generator=g) * dim**-0.5
    return hp.requires_grad_(True), wp.requires_grad_(True), hq, wq


def gradients(kl: torch.Tensor, hp: torch.Tensor, wp: torch.Tensor, seed: int = 1):
    upstream = torch.rand(kl.shape, generator=torch.Generator().manual_seed(seed))  # weights per token
    return torch.autograd.grad((kl * upstream).sum(), (hp, wp))


@pytest.mark.parametrize("vocab", [300, chunked_divergence.VOCAB_CHUNK_SIZE + 77])  # one vocabulary tile, and two
def test_fused_kl_equals_trl_chunked_divergence_beta_1(vocab):
    hp, wp, hq, wq = inputs(vocab, 16, 6)
    trl_kl, _ = chunked_divergence.ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, 1.0)
    ours = fused_kl(LinearLogits(hp[None], wp), LinearLogits(hq[None], wq)).kl[0]
    exact = analytic(hp.double() @ wp.double().T, (hq @ wq.T).double())
    torch.testing.assert_close(trl_kl.double(), exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-6)
    expected = gradients(exact, hp, wp)
    for kl in (trl_kl, ours):
        for got, want in zip(gradients(kl, hp, wp), expected):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


def test_trl_chunked_divergence_beta_1_is_not_the_forward_kl():
    """The comparison can fail: beta = 0 (TRL's forward KL(teacher || student)) differs."""
    hp, wp, hq, wq = inputs(300, 16, 6)
    forward_kl, _ = chunked_divergence.ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, 0.0)
    ours = fused_kl(LinearLogits(hp[None], wp), LinearLogits(hq[None], wq)).kl[0]
    assert (forward_kl - ours).abs().max() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("vocab", [300, 49_152])
def test_fused_kl_equals_trl_chunked_divergence_on_cuda(vocab):
    """On CUDA TRL's kernel runs its Triton path (when Triton is installed) and ``fused_kl`` its
    CUDA matmuls; both against the float64 KL of the materialised logits."""
    hp, wp, hq, wq = (x.detach().cuda() for x in inputs(vocab, 64, 40))
    hp.requires_grad_(True), wp.requires_grad_(True)
    trl_kl, _ = chunked_divergence.ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, 1.0)
    ours = fused_kl(LinearLogits(hp[None], wp), LinearLogits(hq[None], wq)).kl[0]
    exact = analytic(hp.double() @ wp.double().T, (hq.double() @ wq.double().T))
    torch.testing.assert_close(trl_kl.double(), exact, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=1e-5)
    upstream = torch.rand(exact.shape, generator=torch.Generator().manual_seed(1)).cuda()
    expected = torch.autograd.grad((exact * upstream).sum(), (hp, wp))
    for kl in (trl_kl, ours):
        for got, want in zip(torch.autograd.grad((kl * upstream).sum(), (hp, wp)), expected):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-5)
