"""KL-shaped rewards and GAE over padded sequences, against direct loops."""
import pytest
import torch

import kl_estimators
from agents.rollout.advantages import gae, last_valid_index, per_token_kl, shaped_rewards


def reference_gae(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded episode ending in a terminal state."""
    T = len(rewards)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_per_episode_loop_with_padding(gamma, lam):
    torch.manual_seed(0)
    lengths = [4, 1, 3]
    rewards, values = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards * mask, values * mask, mask, gamma, lam)
    for row, n in enumerate(lengths):
        expected = reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        assert advantages[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert advantages[row, n:].abs().sum() == 0
        assert returns[row, :n].tolist() == pytest.approx((advantages[row, :n] + values[row, :n]).tolist(), abs=1e-6)


def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.0, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(advantages, to_go - values)


def test_shaped_rewards_pay_task_reward_at_last_valid_token():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.5, 0.25, 9.0], [1.0, 0.0, 2.0]])
    rewards = shaped_rewards(torch.tensor([2.0, -1.0]), kl, 0.1, mask)
    expected = torch.tensor([[-0.05, -0.025 + 2.0, 0.0], [-0.1, 0.0, -0.2 - 1.0]])
    assert torch.allclose(rewards, expected)
    assert last_valid_index(mask).tolist() == [1, 2]


def test_per_token_kl_uses_the_named_estimator_and_mask():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    exact = torch.tensor([[0.3, 0.7]])
    mask = torch.tensor([[True, False]])
    assert torch.allclose(per_token_kl("k1", logp, ref, exact, mask), kl_estimators.k1(logp, ref) * mask)
    assert torch.allclose(per_token_kl("k3", logp, ref, exact, mask), kl_estimators.k3(logp, ref) * mask)
    assert torch.allclose(per_token_kl("analytic", logp, ref, exact, mask), torch.tensor([[0.3, 0.0]]))
    assert per_token_kl("none", logp, ref, exact, mask).abs().sum() == 0
    with pytest.raises(ValueError, match="kl_reward"):
        per_token_kl("k4", logp, ref, exact, mask)
