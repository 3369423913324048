"""IMDBContinuationEnv: Gymnasium API, reference logits, rewards, seeding, rendering, bad inputs."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.env import IMDBContinuationEnv
from tests.helpers.lmgym import log_softmax, reference_logits, sequence


@pytest.fixture(params=["llama", "gpt2"])
def env_kwargs(request, tiny_lm_path, tiny_gpt2_path, tiny_prompts):
    path = {"llama": tiny_lm_path, "gpt2": tiny_gpt2_path}[request.param]
    return dict(model=path, prompts=tiny_prompts, max_prompt_tokens=6, max_new_tokens=5)


def test_check_env_and_make(env_kwargs):
    env = gym.make("IMDBContinuation-v0", **env_kwargs)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert info["ref_logits"].shape == (env.action_space.n,)
    assert info["ref_logits"].dtype == np.float32


def test_ref_logits_match_full_forward_every_step(env_kwargs):
    env = IMDBContinuationEnv(**env_kwargs)
    model = env.task.ref_model
    obs, info = env.reset(seed=3)
    assert len(sequence(obs)) <= 6, "prompt truncated to max_prompt_tokens"
    rewards = []
    for step in range(1, 10):
        np.testing.assert_allclose(info["ref_logits"], reference_logits(model, sequence(obs)), atol=1e-4, rtol=1e-4)
        previous = info["ref_logits"]
        action = int(np.argsort(previous)[-2]) if int(np.argmax(previous)) == env.task.eos_id else int(np.argmax(previous))
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs in env.observation_space
        assert sequence(obs)[-1] == action
        assert info["ref_logprob"] == pytest.approx(log_softmax(previous)[action], abs=1e-5)
        rewards.append(reward)
        if terminated or truncated:
            break
    np.testing.assert_allclose(info["ref_logits"], reference_logits(model, sequence(obs)), atol=1e-4, rtol=1e-4)
    assert truncated and not terminated and step == 5
    assert rewards[:-1] == [0.0] * 4
    assert rewards[-1] == info["sentiment"]
    assert set(info) == {"ref_logits", "ref_logprob", "prompt", "continuation", "sentiment"}
    assert info["prompt"] in env_kwargs["prompts"]


def test_eos_terminates_and_step_after_end_raises(env_kwargs):
    env = IMDBContinuationEnv(**env_kwargs)
    env.reset(seed=0)
    env.step(5)
    _, reward, terminated, truncated, info = env.step(env.task.eos_id)
    assert terminated and not truncated
    assert info["continuation"] == env.task.decode([5])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(5)


def test_step_before_reset_raises(env_kwargs):
    with pytest.raises(RuntimeError, match="reset"):
        IMDBContinuationEnv(**env_kwargs).step(0)


def test_seeding_is_reproducible(env_kwargs):
    env = IMDBContinuationEnv(**env_kwargs)
    prompts = [env.reset(seed=7)[1]["prompt"] for _ in range(2)]
    assert prompts[0] == prompts[1]
    env.reset(seed=7)
    draws = [env.reset()[1]["prompt"] for _ in range(8)]
    env.reset(seed=7)
    assert draws == [env.reset()[1]["prompt"] for _ in range(8)]
    assert len(set(draws)) > 1


def test_render_ansi(env_kwargs):
    env = IMDBContinuationEnv(render_mode="ansi", **env_kwargs)
    _, info = env.reset(seed=1)
    assert env.render() == info["prompt"] + ""
    env.step(6)
    assert env.render() == info["prompt"] + env.task.decode([6])
    with pytest.raises(ValueError, match="render_mode"):
        IMDBContinuationEnv(render_mode="human", **env_kwargs)


def test_vader_reward_is_default(tiny_lm_path, tiny_prompts):
    env = IMDBContinuationEnv(model=tiny_lm_path, prompts=tiny_prompts, max_new_tokens=2)
    env.reset(seed=0)
    vocab = env.task.tokenizer.get_vocab()
    env.step(vocab["great"])
    _, reward, *_ , info = env.step(vocab["love"])
    assert reward > 0 and info["continuation"] == "great love"


def test_preloaded_objects(tiny_lm_path, tiny_prompts):
    from lmgym.assets import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_lm_path)
    env = IMDBContinuationEnv(
        model=tiny_lm_path, ref_model=model, tokenizer=tokenizer, reward=lambda texts: np.ones(len(texts)),
        prompts=tiny_prompts, max_new_tokens=1,
    )
    assert env.task.ref_model is model
    env.reset(seed=0)
    assert env.step(5)[1] == 1.0


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(not_a_kwarg=1), TypeError, "not_a_kwarg"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_prompt_tokens=0), ValueError, "max_prompt_tokens"),
        (dict(prompts=[]), ValueError, "prompt"),
        (dict(prompts=["  "]), ValueError, "prompt"),
    ],
)
def test_bad_kwargs(tiny_lm_path, tiny_prompts, bad, error, match):
    kwargs = dict(model=tiny_lm_path, prompts=tiny_prompts) | bad
    with pytest.raises(error, match=match):
        IMDBContinuationEnv(**kwargs)
    with pytest.raises(error, match=match):
        gym.make("IMDBContinuation-v0", **kwargs)


def test_action_that_is_not_an_integer_token_id(env_kwargs):
    """Out of range, or not an integer even when it converts to one (3.0, True)."""
    env = IMDBContinuationEnv(**env_kwargs)
    env.reset(seed=0)
    for action in (-1, env.action_space.n, 2.5, 3.0, np.float64(3.0), True, np.True_, "3"):
        with pytest.raises(ValueError, match="integer token id"):
            env.step(action)
    env.step(np.int64(3))  # numpy integers, as Discrete.sample() returns, are token ids


def test_vector_env_refuses_float_and_bool_actions(env_kwargs):
    envs = gym.make_vec("IMDBContinuation-v0", num_envs=2, vectorization_mode="vector_entry_point", **env_kwargs)
    envs.reset(seed=0)
    for actions in ([3.0, 4.0], [True, False]):
        with pytest.raises(ValueError, match="integer token id"):
            envs.step(np.array(actions))


def test_reference_vocab_mismatch(tiny_lm_path, tiny_lm_other_vocab_path, tiny_prompts):
    with pytest.raises(ValueError, match=r"105.*98|98.*105"):
        IMDBContinuationEnv(model=tiny_lm_path, ref_model=tiny_lm_other_vocab_path, prompts=tiny_prompts)


def test_bad_reward_label(tiny_lm_path, tiny_classifier_path, tiny_prompts):
    with pytest.raises(ValueError, match="positive_label=2.*2 labels"):
        IMDBContinuationEnv(model=tiny_lm_path, prompts=tiny_prompts, reward=tiny_classifier_path, positive_label=2)


def test_classifier_reward(tiny_lm_path, tiny_classifier_path, tiny_prompts):
    env = IMDBContinuationEnv(model=tiny_lm_path, prompts=tiny_prompts, reward=tiny_classifier_path, max_new_tokens=1)
    env.reset(seed=0)
    _, reward, _, truncated, info = env.step(5)
    assert truncated and 0.0 < reward < 1.0 and reward == info["sentiment"]


def test_bundled_prompts(tiny_lm_path):
    env = IMDBContinuationEnv(model=tiny_lm_path, max_new_tokens=1)
    _, info = env.reset(seed=0)
    assert info["prompt"] in env.task.prompts and len(env.task.prompts) > 10
