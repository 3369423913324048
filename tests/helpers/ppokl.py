"""Builders shared by the agents tests: tiny batched envs and PPOKL models on them."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from agents import LMGymVecEnv, PPOKL


def make_env(model_path: str, n_envs: int = 4, max_new_tokens: int = 5, **kwargs) -> LMGymVecEnv:
    kwargs.setdefault("prompts", ["this movie was", "i loved the acting and the music but the plot", "a"])
    kwargs.setdefault("reward", lambda texts: np.array([len(t) / 20 - 0.5 for t in texts]))
    venv = gym.make_vec(
        "IMDBContinuation-v0",
        num_envs=n_envs,
        vectorization_mode="vector_entry_point",
        model=model_path,
        max_prompt_tokens=12,
        max_new_tokens=max_new_tokens,
        autoreset_mode=AutoresetMode.SAME_STEP,
        **kwargs,
    )
    return LMGymVecEnv(venv)


def make_model(model_path: str, env: LMGymVecEnv | None = None, **kwargs) -> PPOKL:
    kwargs.setdefault("learning_rate", 1e-3)
    kwargs.setdefault("n_epochs", 2)
    kwargs.setdefault("batch_size", 10)
    kwargs.setdefault("seed", 0)
    policy_kwargs = {"model": model_path, **kwargs.pop("policy_kwargs", {})}
    return PPOKL("CausalLMPolicy", env or make_env(model_path), policy_kwargs=policy_kwargs, **kwargs)


def one_rollout(model) -> None:
    """One rollout of ``model`` into its buffer, without an update."""
    _, callback = model.setup_learn(total_timesteps=10**6, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
