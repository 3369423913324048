"""PPOKL converges toward the KL-regularised optimum pi*(a) ∝ pi_ref(a) exp(r(a) / beta).

One prompt, one generated token (a bandit over the vocabulary): the reward is 1 for one "good"
token and 0 otherwise, and beta is chosen so that pi*(good) = 1/2 exactly, far from both
pi_ref(good) and the unregularised optimum 1.

Adam's steps do not shrink with the gradient, so at a constant learning rate the last iterate keeps
wandering around the optimum: with 3e-3 for 40 iterations, pi(good) ended at 0.46, 0.64, 0.13 and
0.36 for seeds 0-3. The learning rate therefore decays linearly to 0 over 80 iterations; pi(good)
then ends within 0.03 of 1/2 for seeds 0-3 (analytic: 0.505, 0.493, 0.526, 0.516; k1: 0.503,
0.501, 0.503, 0.504), well inside the 0.08 checked.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.agents_helpers import make_env, make_model

PROMPT = "this movie was"


def next_token_distribution(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)


@pytest.mark.parametrize("config", [{"kl_reward": "analytic", "analytic_grad": True}, {"kl_reward": "k1"}])
def test_policy_moves_to_kl_regularised_optimum(tiny_lm_path, config):
    probe = make_env(tiny_lm_path, n_envs=1, max_new_tokens=1, prompts=[PROMPT])
    task = probe.venv.task
    ref = next_token_distribution(task.ref_model, task.tokenizer)
    words = [i for i in range(len(ref)) if i not in task.tokenizer.all_special_ids]
    good = sorted(words, key=lambda i: float(ref[i]))[len(words) // 2]  # a median-probability word
    good_text = task.tokenizer.decode([good], skip_special_tokens=True)
    p = float(ref[good])
    beta = 1.0 / math.log((1 - p) / p)  # pi*(good) = p e^{1/beta} / (p e^{1/beta} + 1 - p) = 1/2
    optimum = ref.clone()
    optimum[good] *= math.exp(1 / beta)
    optimum /= optimum.sum()

    env = make_env(
        tiny_lm_path,
        n_envs=64,
        max_new_tokens=1,
        prompts=[PROMPT],
        reward=lambda texts: np.array([float(t.strip() == good_text) for t in texts]),
    )
    model = make_model(
        tiny_lm_path,
        env,
        kl_coef=beta,
        gamma=1.0,
        gae_lambda=1.0,
        learning_rate=lambda progress_remaining: 3e-3 * progress_remaining,
        n_epochs=4,
        batch_size=64,
        **config,
    )
    model.learn(total_timesteps=80 * 64)
    learned = next_token_distribution(model.policy.lm, task.tokenizer)

    def kl(a, b):
        return float((a * (a.log() - b.log())).sum())

    assert learned[good] == pytest.approx(0.5, abs=0.08)
    assert kl(optimum, learned) < 0.05 * kl(optimum, ref)
