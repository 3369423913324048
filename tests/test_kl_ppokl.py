"""PPOKL's analytic KL term after the first PPO step: the direct term at pi's states, weighted by the
prefix ratio W_{t-1} = prod_{t'<t} pi/mu of the rollout policy mu (``analytic-is``).

That this weighting gives E_pi[sum_t grad KL_t(s_t)] for any mu is proven by enumeration in
``test_kl_expectations.py``; here a tiny LM checks that PPOKL passes the rollout log-probs.
"""
from __future__ import annotations

import torch

import kl_estimators
from agents.algorithm import masked_mean
from tests.helpers.ppokl import make_model
from tests.helpers.ppokl import one_rollout


def test_analytic_term_after_a_policy_change_is_prefix_weighted(tiny_lm_path):
    model = make_model(tiny_lm_path, analytic_grad=True, kl_reward="analytic", kl_coef=0.3)
    one_rollout(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after some optimiser steps: pi != mu
        for p in model.policy.lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = model.rollout_buffer.sequences(torch.arange(model.n_envs))
    logits, _ = model.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
    logits = logits.detach().requires_grad_(True)
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    (grad_ours,) = torch.autograd.grad(model.kl_loss_term(batch, logits, logprobs), logits)

    log_rho = torch.where(batch.mask, logprobs.detach() - batch.old_logprobs, 0.0)
    prefix_weight = torch.exp(log_rho.cumsum(-1) - log_rho)  # W_{t-1}
    kl = kl_estimators.analytic(logits, batch.ref_logits)
    mask = batch.mask.float()
    (grad_weighted,) = torch.autograd.grad(0.3 * masked_mean(prefix_weight * kl, mask), logits, retain_graph=True)
    (grad_unweighted,) = torch.autograd.grad(0.3 * masked_mean(kl, mask), logits)
    assert (prefix_weight[batch.mask] - 1).abs().max() > 1e-2  # the change is visible
    torch.testing.assert_close(grad_ours, grad_weighted, rtol=1e-5, atol=1e-8)
    assert (grad_ours - grad_unweighted).abs().max() > 1e-3 * grad_unweighted.abs().max()
