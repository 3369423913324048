"""The task seam: an env's prompts, reward and assets come from a registered task (``lmgym.tasks``);
IMDB is the default one, and a second tiny task plugs in by name."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.task import ContinuationTask
from lmgym.tasks import make_task, register_task, task_names

WORDS = ["one two", "three four five"]


def count_task(**kwargs) -> ContinuationTask:
    """A toy task: fixed prompts, reward = the number of characters written."""
    return ContinuationTask(**{**kwargs, "prompts": WORDS, "reward": lambda texts: np.array([float(len(t)) for t in texts])})


register_task("tiny-count", count_task)


def test_imdb_is_the_default_task_and_unknown_names_are_refused(tiny_lm_path, tiny_prompts):
    assert {"imdb", "tiny-count"} <= set(task_names())
    env = gym.make("IMDBContinuation-v0", model=tiny_lm_path, prompts=tiny_prompts, max_prompt_tokens=6, max_new_tokens=2)
    assert env.unwrapped.task.prompts == list(tiny_prompts)
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("no-such-task")
    with pytest.raises(ValueError, match="already registered"):
        register_task("tiny-count", count_task)


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_registered_task_gives_the_env_its_prompts_and_reward(tiny_lm_path, vectorised):
    kwargs = dict(task="tiny-count", model=tiny_lm_path, max_prompt_tokens=6, max_new_tokens=3)
    if vectorised:
        env = gym.make_vec("IMDBContinuation-v0", num_envs=2, vectorization_mode="vector_entry_point", **kwargs)
    else:
        env = gym.make("IMDBContinuation-v0", **kwargs)
    task = env.unwrapped.task
    assert task.prompts == WORDS
    env.reset(seed=0)
    token = next(t for t in (5, 6, 7) if t != task.eos_id)  # no EOS: every episode runs its 3 tokens
    for _ in range(3):
        _, rewards, terminated, truncated, infos = env.step(np.full(2, token) if vectorised else token)
    assert np.all(np.logical_or(terminated, truncated))
    continuations = list(infos["continuation"]) if vectorised else [infos["continuation"]]
    assert all(continuations)
    np.testing.assert_array_equal(np.atleast_1d(rewards), [float(len(text)) for text in continuations])
