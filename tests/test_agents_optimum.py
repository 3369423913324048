"""PPOKL converges toward the KL-regularised optimum pi*(a) ∝ pi_ref(a) exp(r(a) / beta).

One prompt, one generated token (a bandit over the vocabulary): the reward is 1 for one "good"
token and 0 otherwise, and beta is chosen so that pi*(good) = 1/2 exactly, far from both
pi_ref(good) and the unregularised optimum 1.

The instance is fixed by rules that do not depend on a machine's float rounding: the good token
is the word whose pi_ref is closest to 0.05 (in log ratio; 0.041 with the tiny model here, so
beta = 0.32 and about 2.6 good tokens are sampled per iteration at the start), and the learning
rate decays linearly from 3e-3 to 0 over the 40 iterations, which averages out the stochastic
updates' noise around the fixed point. Measured (OMP_NUM_THREADS=1) over seeds 0-29 of each
configuration, as stand-ins for the trajectories another CPU's rounding would give: worst
|pi(good) - 0.5| at the end 0.041 (analytic) and 0.016 (k1), worst KL(pi* || pi) / KL(pi* ||
pi_ref) 0.023 and 0.020; and over 6 seeds each with the target 0.02 or 0.1 instead of 0.05,
worst 0.051 and 0.031. The bounds below (0.08 and 0.05) keep at least a third of a margin.
With a constant learning rate the end point fluctuated by +-0.11 around 0.5 from seed to seed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers.ppokl import make_env, make_model

PROMPT = "this movie was"
TARGET_REF_PROB = 0.05
ITERATIONS = 40
N_ENVS = 64


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
    good = min(words, key=lambda i: abs(math.log(float(ref[i]) / TARGET_REF_PROB)))
    good_text = task.tokenizer.decode([good], skip_special_tokens=True)
    p = float(ref[good])
    assert 0.02 <= p <= 0.1  # the range over which the margins were measured
    beta = 1.0 / math.log((1 - p) / p)  # pi*(good) = p e^{1/beta} / (p e^{1/beta} + 1 - p) = 1/2
    optimum = ref.clone()
    optimum[good] *= math.exp(1 / beta)
    optimum /= optimum.sum()

    env = make_env(
        tiny_lm_path,
        n_envs=N_ENVS,
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
        batch_size=N_ENVS,
        **config,
    )
    model.learn(total_timesteps=ITERATIONS * N_ENVS)
    learned = next_token_distribution(model.policy.lm, task.tokenizer)

    def kl(a, b):
        return float((a * (a.log() - b.log())).sum())

    assert learned[good] == pytest.approx(0.5, abs=0.08)
    assert kl(optimum, learned) < 0.05 * kl(optimum, ref)
