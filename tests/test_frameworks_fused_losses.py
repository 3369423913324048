"""The fused and compiled GRPO losses against ``kl_estimators``: Liger-Kernel 0.8.5's
``LigerFusedLinearGRPOLoss``, Unsloth Zoo 2026.10.9's ``grpo_compute_loss`` and TRL 1.16.0's
``ChunkedDivergenceFunction`` (trl/kernels/chunked_divergence.py), value and gradient.

Liger-Kernel needs triton to install, but its chunked losses import with torch alone and run on CPU
with ``compiled=False`` (the torch path): it is imported from .venv/frameworks. Unsloth Zoo pins
trl <= 1.15 and does not import without a GPU: ``grpo_compute_loss`` is executed verbatim from the
installed file. TRL's kernel falls back to torch tiles off Triton devices. With zero advantages the
policy terms of the GRPO losses are 0 in value and gradient, so what is left is beta x the KL term.
"""

from __future__ import annotations

import pytest
import torch

import kl_estimators as kl
from kl_estimators.frameworks import FRAMEWORK_VERSIONS
from tests.helpers.framework_source import import_installed, installed_version, load

B, T, H, V = 3, 4, 5, 11


@pytest.mark.parametrize(("framework", "dist"), (("liger-kernel", "liger_kernel"), ("unsloth-zoo", "unsloth_zoo")))
def test_locked_versions(framework, dist):
    """The installed version is the one the map describes (a lock to another version fails here)."""
    assert installed_version(dist) == FRAMEWORK_VERSIONS[framework]


def _model(seed: int, dtype=torch.float64):
    """Hidden states and output layers of a policy and a reference, sampled tokens, a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(True)
    ref_hidden = hidden.detach() + 0.5 * torch.randn(B, T, H, generator=g, dtype=dtype)
    ref_weight = weight.detach() + 0.5 * torch.randn(V, H, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T) < torch.tensor([T, T - 1, 2]).unsqueeze(1)
    return hidden, weight, ref_hidden, ref_weight, tokens, mask


def _logps(hidden, weight, tokens, temperature=1.0):
    return ((hidden @ weight.T) / temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _assert_loss_and_grads(theirs, ours, params, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(theirs.double(), ours.double(), rtol=rtol, atol=atol)
    for a, b in zip(torch.autograd.grad(theirs, params), torch.autograd.grad(ours, params)):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# -- Liger-Kernel -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liger():
    return import_installed("liger_kernel.chunked_loss.grpo_loss").LigerFusedLinearGRPOLoss


@pytest.mark.parametrize("fused_ref", (False, True), ids=("ref_per_token_logps", "ref_input+ref_weight"))
@pytest.mark.parametrize("bias_correction", (False, True))
def test_liger_grpo_kl(liger, fused_ref, bias_correction):
    """LigerFusedLinearGRPOLoss (beta 0.04 by default, loss_type 'dapo': token sum / the batch's tokens):
    beta x k3-loss from the fused policy log-probs; with use_bias_correction_kl, beta x k3-ratio
    (rho = exp(logp - old_logp), differentiable). The reference log-prob comes from
    ref_per_token_logps or is fused from ref_input / ref_weight (same value)."""
    hidden, weight, ref_hidden, ref_weight, tokens, mask = _model(seed=1 + 2 * fused_ref + bias_correction)
    ref = _logps(ref_hidden, ref_weight, tokens)
    old = _logps(hidden, weight, tokens).detach() + 0.3 * torch.sin(torch.arange(B * T).reshape(B, T).double())
    loss_fn = liger(compiled=False, use_bias_correction_kl=bias_correction)
    assert loss_fn.beta == 0.04 and loss_fn.loss_type == "dapo"
    refs = dict(ref_input=ref_hidden, ref_weight=ref_weight) if fused_ref else dict(ref_per_token_logps=ref)
    theirs, _ = loss_fn(hidden, weight, tokens, mask.long(), torch.zeros(B, dtype=torch.float64),
                        old_per_token_logps=old, **refs)
    estimator = "k3-ratio" if bias_correction else "k3-loss"
    logps = _logps(hidden, weight, tokens)
    terms = kl.per_token_kl_loss(estimator, logps, ref, mask, behaviour_logprobs=old if bias_correction else None)
    _assert_loss_and_grads(theirs, 0.04 * terms.sum() / mask.sum(), (hidden, weight), rtol=1e-5, atol=1e-6)


def test_liger_without_reference_has_no_kl(liger):
    """use_ref_model=False: the reference log-prob is the policy's own (detached), so the KL term is 0."""
    hidden, weight, _, _, tokens, mask = _model(seed=7)
    loss_fn = liger(compiled=False, use_ref_model=False, beta=0.5)
    loss, _ = loss_fn(hidden, weight, tokens, mask.long(), torch.zeros(B, dtype=torch.float64))
    assert loss.item() == 0.0


# -- Unsloth Zoo --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsloth():
    return load("unsloth_zoo/rl_replacements.py", ("grpo_compute_loss",))["grpo_compute_loss"]


@pytest.mark.parametrize("loss_type", ("grpo", "bnpo"))
@pytest.mark.parametrize("bias_correction", (False, True))
def test_unsloth_grpo_kl(unsloth, loss_type, bias_correction):
    """``grpo_compute_loss`` (the trainer forwards TRL's beta and use_bias_correction_kl): beta x k3-loss,
    or beta x k3-ratio with use_bias_correction_kl, clamped to [-10, 10] after the ratio (zero gradient
    beyond), then TRL's loss_type aggregation ('grpo': each sequence / its length; 'bnpo': batch tokens)."""
    hidden, weight, ref_hidden, ref_weight, tokens, mask = _model(seed=10 + bias_correction)
    logps = _logps(hidden, weight, tokens)
    ref = _logps(ref_hidden, ref_weight, tokens)
    old = logps.detach() + 0.2
    loss = unsloth(ref, logps, old, None, tokens, mask.long(), 0.1, torch.zeros(B, 1, dtype=torch.float64),
                   loss_type=loss_type, use_bias_correction_kl=bias_correction)[0]
    estimator = "k3-ratio" if bias_correction else "k3-loss"
    logps = _logps(hidden, weight, tokens)  # a graph of its own
    terms = kl.per_token_kl_loss(estimator, logps, ref, mask, behaviour_logprobs=old if bias_correction else None)
    ours = (terms.sum(-1) / mask.sum(-1)).mean() if loss_type == "grpo" else terms.sum() / mask.sum()
    _assert_loss_and_grads(loss, 0.1 * ours, (hidden, weight))


def test_unsloth_k3_clamp(unsloth):
    """k3 is clamped at 10: beyond, the KL term is constant (value 10, no gradient)."""
    logps = torch.tensor([[-15.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5]], dtype=torch.float64)
    loss = unsloth(ref, logps, logps.detach(), None, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 0]]),
                   1.0, torch.zeros(1, 1, dtype=torch.float64), loss_type="grpo")[0]
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.item() == 10.0 and grad.abs().sum().item() == 0.0


# -- TRL's chunked divergence -------------------------------------------------------------------------


def test_trl_chunked_divergence_is_the_exact_kl():
    """``ChunkedDivergenceFunction`` with beta = 1.0 (TRL's DistillationTrainer's reverse KL) is
    KL(pi(.|s_t) || pi_ref(.|s_t)) over the full vocabulary, from hidden states and output layers:
    ``kl_estimators.fused_kl``'s KL_t (the ``analytic`` estimator's term), value and gradient. Only
    TRL's distillation trainers call it; no TRL RL trainer has an exact-KL option."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hidden, weight, ref_hidden, ref_weight, tokens, mask = _model(seed=20, dtype=torch.float32)
    theirs, _ = ChunkedDivergenceFunction.apply(hidden.reshape(-1, H), weight, None, ref_hidden.reshape(-1, H),
                                                ref_weight, None, 1.0, 1.5)
    ours = kl.fused_kl(kl.LinearLogits(hidden, weight, temperature=1.5),
                       kl.LinearLogits(ref_hidden, ref_weight, temperature=1.5)).kl.reshape(-1)
    m = mask.reshape(-1).float()
    _assert_loss_and_grads((theirs * m).sum(), (ours * m).sum(), (hidden, weight), rtol=1e-5, atol=1e-6)
    full = kl.analytic(hidden @ weight.T / 1.5, ref_hidden @ ref_weight.T / 1.5, mask=mask)
    torch.testing.assert_close(theirs.reshape(B, T)[mask], full[mask], rtol=1e-5, atol=1e-6)
