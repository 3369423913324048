"""sample_episodes: pi_ref scored in one forward after sampling equals pi_ref stepped with the env."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.rollout import sampling
from agents.rollout.reference import Reference
from agents.rollout.sampling import sample_episodes, trim_left_padding
from tests.helpers.ppokl import make_env, make_model

EOS_AT = {1: [1], 3: [0, 2]}  # sampler call -> rows forced to write EOS (episodes end mid-rollout)


def rollout(model, env, seed: int, monkeypatch) -> list:
    original = sampling.sample_categorical
    calls = []

    def sample_with_forced_eos(logits):
        actions, _ = original(logits)
        actions[EOS_AT.get(len(calls), [])] = env.venv.task.eos_id
        calls.append(1)
        return actions, logits.log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1)

    monkeypatch.setattr(sampling, "sample_categorical", sample_with_forced_eos)
    env.seed(seed)
    obs = env.reset()
    torch.manual_seed(seed)
    steps = list(sample_episodes(model.policy, env, Reference(env.reference_model), *trim_left_padding(obs["input_ids"], obs["attention_mask"]), env.max_new_tokens))
    monkeypatch.undo()
    return steps


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_after_sampling_equals_reference_per_step(tiny_lm_path, monkeypatch, seed):
    per_step = make_env(tiny_lm_path, n_envs=4, max_new_tokens=5)
    after = make_env(tiny_lm_path, n_envs=4, max_new_tokens=5, step_ref_logits=False)
    calls = []
    after.venv.task.ref_model.register_forward_pre_hook(lambda *args: calls.append(1))
    model = make_model(tiny_lm_path, per_step)
    expected = rollout(model, per_step, seed, monkeypatch)
    steps = rollout(model, after, seed, monkeypatch)
    assert calls == [1], "one reference forward for the whole rollout"
    assert len(steps) == len(expected) == 5
    assert not steps[-1].active[[0, 1, 2]].any(), "the forced EOS ended episodes mid-rollout"
    for step, reference in zip(steps, expected):
        assert torch.equal(step.active, reference.active) and torch.equal(step.actions, reference.actions)
        np.testing.assert_array_equal(step.rewards, reference.rewards)
        torch.testing.assert_close(step.logprobs, reference.logprobs)
        on = step.active
        torch.testing.assert_close(step.ref_logits[on], reference.ref_logits[on], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.ref_logprobs[on], reference.ref_logprobs[on], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.analytic_kl[on], reference.analytic_kl[on], atol=1e-4, rtol=1e-4)
        ref_logprobs = [info["ref_logprob"] for info, active in zip(reference.infos, on) if active]
        torch.testing.assert_close(reference.ref_logprobs[on], torch.tensor(ref_logprobs, dtype=torch.float32), atol=1e-5, rtol=1e-5)
