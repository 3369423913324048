"""verl 0.9.1 and OpenRLHF 0.11.2 KL code against ``kl_estimators``: value and gradient, float64.

Their functions are executed from the installed files (``tests/helpers/framework_source.py``: neither
package imports on CPU without Ray / DeepSpeed / flash-attn). OpenRLHF casts to float32 inside
``compute_approx_kl``, so its comparisons use float32 tolerances.
"""

from __future__ import annotations

import types

import pytest
import torch

import kl_estimators as kl
from kl_estimators.frameworks import FRAMEWORK_VERSIONS
from tests.helpers.framework_source import installed_file, installed_version, load
from tests.helpers.framework_tensors import AGG, assert_same, random_logps

VERL_CORE = "verl/trainer/ppo/core_algos.py"
OPENRLHF_UTILS = "openrlhf/models/utils.py"


@pytest.mark.parametrize("package", ("verl", "openrlhf"))
def test_locked_versions(package):
    """The installed version is the one the map describes (a lock to another version fails here)."""
    assert installed_version(package) == FRAMEWORK_VERSIONS[package]


# -- verl ---------------------------------------------------------------------------------------------

VERL_NAMES = {"k1": "k1-loss", "kl": "k1-loss", "abs": "abs-loss", "k2": "k2-loss", "mse": "k2-loss",
              "k3": "k3-loss", "low_var_kl": "k3-loss", "k1+": "k1+", "kl+": "k1+", "k3+": "k3+",
              "low_var_kl+": "k3+", "k2+": "k2-loss", "mse+": "k2-loss"}


@pytest.fixture(scope="module")
def verl():
    return load(VERL_CORE, ("kl_penalty", "kl_penalty_forward"))


@pytest.mark.parametrize("name", sorted(VERL_NAMES))
def test_verl_kl_penalty(verl, name):
    """``kl_penalty(logprob, ref_logprob, name)``, the term ``ppo_loss`` adds with use_kl_loss
    (kl_loss_type) and ``apply_kl_penalty`` puts in the reward (kl_penalty): the named estimator
    (inside verl's clamps; "+" = value of the base estimator, gradient of k2, since v0.8.0)."""
    logps, ref, _, mask = random_logps(seed=len(name))
    ours = kl.per_token_kl_loss(VERL_NAMES[name], logps, ref, mask)
    assert_same(verl["kl_penalty"](logps, ref, name), ours, logps, mask)


def test_verl_abs_plus(verl):
    """"abs+": value |k1| (abs-loss), gradient of k2 (k2-loss): no estimator of its own here."""
    logps, ref, _, mask = random_logps(seed=7)
    theirs = verl["kl_penalty"](logps, ref, "abs+")
    assert_same(theirs, kl.per_token_kl_loss("abs-loss", logps, ref, mask), logps, mask, gradient=False)
    assert_same(theirs, kl.per_token_kl_loss("k2-loss", logps, ref, mask), logps, mask, value=False)


def test_verl_k3_clamps(verl):
    """low_var_kl clamps log(pi_ref/pi) to [-20, 20] and k3 to [-10, 10]: beyond, value 10 and zero gradient."""
    logps = torch.tensor([[-15.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5]], dtype=torch.float64)
    value = verl["kl_penalty"](logps, ref, "low_var_kl")
    (grad,) = torch.autograd.grad(value.sum(), logps)
    assert value[0, 0].item() == 10.0 and grad[0, 0].item() == 0.0
    torch.testing.assert_close(value[0, 1], kl.k3(logps, ref)[0, 1])


def test_verl_full_raises(verl):
    """kl_loss_type="full" (the exact KL) is not implemented in verl."""
    logps, ref, _, _ = random_logps(seed=0)
    with pytest.raises(NotImplementedError):
        verl["kl_penalty"](logps, ref, "full")


@pytest.fixture(scope="module")
def verl_agg():
    functional = load("verl/utils/torch_functional.py", ("masked_sum",))
    return load(VERL_CORE, ("agg_loss",), {"verl_F": types.SimpleNamespace(masked_sum=functional["masked_sum"])})["agg_loss"]


@pytest.mark.parametrize("mode", sorted(AGG))
def test_verl_loss_agg_mode(verl_agg, mode):
    """``agg_loss`` (one process, no global batch info): token-mean divides by the batch's token
    count, seq-mean-token-mean each sequence by its own length (weights 1/length)."""
    logps, ref, _, mask = random_logps(seed=11)
    terms = lambda: kl.per_token_kl_loss("k3-loss", logps, ref, mask)  # noqa: E731  (one graph per side)
    assert_same(verl_agg(loss_mat=terms(), loss_mask=mask, loss_agg_mode=mode).reshape(1, 1),
                 AGG[mode](terms(), mask.double()).reshape(1, 1), logps, torch.ones(1, 1, dtype=torch.bool),
                 rtol=1e-7)  # seq-mean-token-mean divides by (length + 1e-8)


def test_verl_ppo_loss_kl_lines():
    """``ppo_loss`` feeds kl_penalty the current and reference log-probs only (no old log-probs: no
    importance weight, whatever the number of PPO epochs) and aggregates with loss_agg_mode."""
    source = installed_file("verl/workers/utils/losses.py").read_text()
    assert "kld = kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=config.kl_loss_type)" in source
    assert "loss_mat=kld, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode" in source
    assert "policy_loss += kl_loss * config.kl_loss_coef" in source


# -- OpenRLHF -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openrlhf():
    return load(OPENRLHF_UTILS, ("KL_IS_WEIGHT_CLIP", "compute_approx_kl", "compute_reward", "masked_mean"))


@pytest.mark.parametrize(("name", "estimator"), (("k1", "k1-loss"), ("k2", "k2-loss"), ("k3", "k3-loss")))
def test_openrlhf_kl_loss(openrlhf, name, estimator):
    """--algo.kl.use_loss with --algo.kl.estimator k1/k2/k3: ``compute_approx_kl`` is the named
    estimator (float32, value clamped to [-10, 10]), no importance weight."""
    logps, ref, _, mask = random_logps(seed=3, dtype=torch.float32)
    theirs = openrlhf["compute_approx_kl"](logps, ref, kl_estimator=name)
    assert_same(theirs, kl.per_token_kl_loss(estimator, logps, ref, mask), logps, mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ("k1", "k2", "k3"))
def test_openrlhf_unbiased_gradient(openrlhf, name):
    """--algo.kl.unbiased_gradient: value of the chosen estimator, gradient sg(min(w, 10)) grad k2
    with w = pi/pi_old: the gradient of k3+is with weight_clip=KL_IS_WEIGHT_CLIP (= 10)."""
    assert openrlhf["KL_IS_WEIGHT_CLIP"] == 10.0
    logps, ref, old, mask = random_logps(seed=4, dtype=torch.float32)
    old = old.clone()
    old[0, 0] = logps[0, 0].detach() - 3.0  # w = e^3 > 10: the clip is active there
    theirs = openrlhf["compute_approx_kl"](logps, ref, log_probs_old=old, kl_estimator=name, unbiased_gradient=True)
    ours = kl.per_token_kl_loss("k3+is", logps, ref, mask, behaviour_logprobs=old, weight_clip=10.0)
    assert_same(theirs, ours, logps, mask, rtol=1e-5, atol=1e-6, value=False)
    value = kl.per_token_kl_loss(f"{name}-loss", logps, ref, mask)
    torch.testing.assert_close(theirs[mask], value[mask].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "estimator"), (("k1", "reinforce-future"), ("k3", "k3-reward")))
def test_openrlhf_kl_in_reward(openrlhf, name, estimator):
    """Without use_loss: ``compute_reward`` puts -kl_coef x k_t at every token (task reward at the
    last): with gamma = 1 the policy-gradient surrogate sum_t score_t x sum_{t'>=t} (-r_t') has the
    gradient of ``estimator`` (reward-to-go of k_t at the rollout policy)."""
    logps, ref, _, mask = random_logps(seed=5, dtype=torch.float32)
    k = openrlhf["compute_approx_kl"](logps.detach(), ref, kl_estimator=name)
    rewards = openrlhf["compute_reward"](torch.zeros(logps.shape[0]), 1.0, k, action_mask=mask)
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    surrogate = -(logps - logps.detach()) * returns  # REINFORCE with the return-to-go, gamma = 1
    ours = kl.per_token_kl_loss(estimator, logps, ref, mask)
    assert_same(surrogate, ours, logps, mask, rtol=1e-5, atol=1e-6, value=False)


@pytest.fixture(scope="module")
def openrlhf_aggregate(openrlhf):
    return load("openrlhf/models/loss.py", ("aggregate_loss",), {"masked_mean": openrlhf["masked_mean"]})["aggregate_loss"]


@pytest.mark.parametrize(("token_level", "mode"), ((True, "token-mean"), (False, "seq-mean-token-mean")))
def test_openrlhf_loss_agg_mode(openrlhf_aggregate, token_level, mode):
    """--actor.loss_agg_mode token-mean / seq-mean-token-mean (``aggregate_loss``), applied to the KL loss too."""
    logps, ref, _, mask = random_logps(seed=12)
    terms = lambda: kl.per_token_kl_loss("k3-loss", logps, ref, mask)  # noqa: E731  (one graph per side)
    assert_same(openrlhf_aggregate(terms(), mask.double(), token_level_loss=token_level).reshape(1, 1),
                 AGG[mode](terms(), mask.double()).reshape(1, 1), logps, torch.ones(1, 1, dtype=torch.bool),
                 rtol=1e-7)  # seq-mean-token-mean divides by (length + 1e-8)


def test_openrlhf_actor_kl_lines():
    """``training_step``: KL loss = aggregate_loss(compute_approx_kl(pi, pi_ref, pi_old)) x kl_ctl
    (the adaptive controller's value when --algo.kl.target is set scales the KL loss too)."""
    source = installed_file("openrlhf/trainer/ray/ppo_actor.py").read_text()
    assert "kl_loss = aggregate_loss(kl, experience.action_mask, **loss_batch_info)" in source
    assert "loss = actor_loss + kl_loss * kl_ctl" in source


# -- KL in the reward, double counting, controllers -----------------------------------------------------


def test_verl_kl_in_reward_lines():
    """algorithm.use_kl_in_reward: ``apply_kl_penalty`` subtracts beta x kl_penalty(old_log_probs,
    ref_log_prob) from each token's reward (k at the rollout policy, fixed during the PPO epochs) and
    updates the controller with the batch mean of the per-token-mean KL."""
    source = installed_file("verl/trainer/ppo/ray_trainer.py").read_text()
    assert 'data.batch["old_log_probs"], data.batch["ref_log_prob"], kl_penalty=kl_penalty' in source
    assert "token_level_rewards = token_level_scores - beta * kld" in source
    assert "current_kl = masked_mean(kld, mask=response_mask, axis=-1)" in source


def test_verl_kl_in_reward_and_loss_both_allowed():
    """use_kl_in_reward and use_kl_loss can both be on: verl only prints a notice (KL counted twice)."""
    source = installed_file("verl/utils/config.py").read_text()
    assert 'if config.algorithm.get("use_kl_in_reward", False) and config.actor_rollout_ref.actor.use_kl_loss:\n' \
           '        print("NOTICE: You have both enabled in-reward kl and kl loss.")' in source


@pytest.mark.parametrize(("relative", "current"), (
    ("verl/trainer/ppo/core_algos.py", "current_kl"), ("openrlhf/trainer/ppo_utils/kl_controller.py", "current")))
def test_adaptive_controllers(relative, current):
    """verl's algorithm.kl_ctrl (type=adaptive) and OpenRLHF's --algo.kl.target: the same proportional
    controller as ``kl_estimators.AdaptiveKLController`` (equal coefficients over random updates)."""
    import numpy as np

    theirs = load(relative, ("AdaptiveKLController",), {"np": np})["AdaptiveKLController"](0.1, 6.0, 1000)
    ours = kl.AdaptiveKLController(0.1, 6.0, 1000)
    g = torch.Generator().manual_seed(0)
    for observed, n in zip((12 * torch.rand(20, generator=g)).tolist(), torch.randint(1, 300, (20,), generator=g).tolist()):
        theirs.update(**{current: observed, "n_steps": n})
        ours.update(observed, n)
        assert theirs.value == pytest.approx(ours.value, rel=1e-12)
