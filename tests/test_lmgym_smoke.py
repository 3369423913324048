"""The embedded SmolLM2-135M model end to end (converted once into the user cache, then reused)."""

import gymnasium as gym
import numpy as np
import pytest

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)


@pytest.mark.smoke
def test_embedded_model_env():
    env = gym.make("IMDBContinuation-v0", max_new_tokens=2)
    obs, info = env.reset(seed=0)
    assert info["ref_logits"].shape == (49152,) and env.action_space.n == 49152
    assert obs in env.observation_space
    action = int(np.argmax(info["ref_logits"]))
    obs, reward, terminated, truncated, info = env.step(action)
    assert info["ref_logits"].shape == (49152,) and np.isfinite(info["ref_logprob"])
    assert info["ref_logprob"] > -5, "the reference model's greedy token is likely under itself"
    envs = gym.make_vec("IMDBContinuation-v0", num_envs=2, vectorization_mode="vector_entry_point",
                        ref_model=env.unwrapped.task.ref_model, max_new_tokens=2)
    obs, info = envs.reset(seed=0)
    assert info["ref_logits"].shape == (2, 49152)
