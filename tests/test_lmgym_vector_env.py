"""IMDBContinuationVectorEnv: batched reference logits equal per-sequence full forwards, autoreset modes."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.vector_env import IMDBContinuationVectorEnv

from tests.helpers.lmgym import log_softmax, reference_logits, sequence

N = 4


def sub_obs(obs, i):
    return {key: value[i] for key, value in obs.items()}


def assert_ref_logits(envs, obs, ref_logits):
    for i in range(envs.num_envs):
        expected = reference_logits(envs.task.ref_model, sequence(sub_obs(obs, i)))
        np.testing.assert_allclose(ref_logits[i], expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(params=["llama", "gpt2"])
def vec_kwargs(request, tiny_lm_path, tiny_gpt2_path, tiny_prompts):
    path = {"llama": tiny_lm_path, "gpt2": tiny_gpt2_path}[request.param]
    return dict(num_envs=N, model=path, prompts=tiny_prompts, max_prompt_tokens=8, max_new_tokens=4)


def non_eos_actions(envs, step):
    """Deterministic actions that are never EOS."""
    return np.array([5 + (step * N + i) % 20 for i in range(envs.num_envs)])


def test_make_vec_and_spaces(vec_kwargs):
    envs = gym.make_vec("IMDBContinuation-v0", vectorization_mode="vector_entry_point", **vec_kwargs)
    assert isinstance(envs.unwrapped, IMDBContinuationVectorEnv)
    assert envs.num_envs == N and envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = envs.reset(seed=0)
    assert obs in envs.observation_space
    assert info["ref_logits"].shape == (N, envs.single_action_space.n) and info["ref_logits"].dtype == np.float32
    assert info["_prompt"].all()
    obs, rewards, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert obs in envs.observation_space
    assert rewards.shape == terminated.shape == truncated.shape == info["ref_logprob"].shape == (N,)


def test_steady_state_is_one_forward_of_length_one(vec_kwargs):
    envs = IMDBContinuationVectorEnv(**vec_kwargs)
    calls = []
    envs.task.ref_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    envs.reset(seed=0)
    assert len(calls) == 1 and calls[0][0] == N
    for step in range(3):
        envs.step(non_eos_actions(envs, step))
    assert calls[1:] == [(N, 1)] * 3


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_restart_encodes_only_the_new_prompts(vec_kwargs, mode):
    """A sub-env that starts a new episode costs an encode of its prompt alone, not of every row."""
    envs = IMDBContinuationVectorEnv(autoreset_mode=mode, **vec_kwargs)
    calls = []
    envs.task.ref_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    envs.reset(seed=0)
    actions = non_eos_actions(envs, 0)
    actions[[1, 3]] = envs.task.eos_id
    envs.step(actions)
    if mode == AutoresetMode.NEXT_STEP:
        envs.step(non_eos_actions(envs, 1))
    one_token_steps = 2 if mode == AutoresetMode.NEXT_STEP else 1
    assert calls[1:-1] == [(N, 1)] * one_token_steps
    assert calls[-1] == (2, max(len(envs.tokens[i]) for i in (1, 3)))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, "NextStep", "SameStep"])
def test_ref_logits_match_full_forward_with_forced_eos(vec_kwargs, mode):
    envs = IMDBContinuationVectorEnv(autoreset_mode=mode, **vec_kwargs)
    mode = AutoresetMode(mode)
    eos = envs.task.eos_id
    obs, info = envs.reset(seed=1)
    assert len({int(m.sum()) for m in obs["attention_mask"]}) > 1, "prompts of different lengths"
    assert_ref_logits(envs, obs, info["ref_logits"])
    needs_reset = np.zeros(N, dtype=bool)
    finished = 0
    for step in range(14):
        actions = non_eos_actions(envs, step)
        if step in (1, 6):
            actions[1] = eos  # one sub-env ends mid-batch
        if step == 9:
            actions[[0, 2]] = eos
        previous = info["ref_logits"]
        obs, rewards, terminated, truncated, info = envs.step(actions)
        assert obs in envs.observation_space
        assert_ref_logits(envs, obs, info["ref_logits"])
        done = terminated | truncated
        for i in range(N):
            if needs_reset[i]:  # NEXT_STEP: this step started a new episode, the action was ignored
                assert info["_prompt"][i] and not done[i] and rewards[i] == 0 and info["ref_logprob"][i] == 0
                assert sequence(sub_obs(obs, i)) == envs.tokens[i] and envs.num_generated[i] == 0
            else:
                expected = log_softmax(previous[i])[actions[i]]
                assert info["ref_logprob"][i] == pytest.approx(expected, abs=1e-5)
            assert terminated[i] == (not needs_reset[i] and actions[i] == eos)
            if not done[i]:
                assert rewards[i] == 0
        finished += done.sum()
        if mode == AutoresetMode.NEXT_STEP:
            for i in np.flatnonzero(done):
                assert info["_sentiment"][i] and info["sentiment"][i] == rewards[i]
                assert sequence(sub_obs(obs, i))[-1] == actions[i]
            needs_reset = done
        elif done.any():
            final = info["final_info"]
            assert (info["_final_obs"] == done).all() and (final["_continuation"] == done).all()
            for i in np.flatnonzero(done):
                assert final["sentiment"][i] == rewards[i]
                assert sequence(info["final_obs"][i])[-1] == actions[i]
                expected = reference_logits(envs.task.ref_model, sequence(info["final_obs"][i]))
                np.testing.assert_allclose(final["ref_logits"][i], expected, atol=1e-4, rtol=1e-4)
                assert info["_prompt"][i] and envs.num_generated[i] == 0
    assert finished >= 6


def test_truncation_of_all_envs_together(vec_kwargs):
    envs = IMDBContinuationVectorEnv(**vec_kwargs)
    envs.reset(seed=0)
    for step in range(4):
        _, rewards, terminated, truncated, info = envs.step(non_eos_actions(envs, step))
    assert truncated.all() and not terminated.any()
    assert list(info["continuation"]) == [envs.task.decode(envs._generated(i)) for i in range(N)]
    np.testing.assert_allclose(rewards, info["sentiment"])
    obs, rewards, terminated, truncated, info = envs.step(non_eos_actions(envs, 0))
    assert info["_prompt"].all() and (rewards == 0).all() and obs["attention_mask"].sum(1).max() <= 8
    assert_ref_logits(envs, obs, info["ref_logits"])


def test_seeding_is_reproducible(vec_kwargs):
    def rollout(seed):
        envs = IMDBContinuationVectorEnv(**vec_kwargs)
        obs, _ = envs.reset(seed=seed)
        observations = [obs["input_ids"]]
        for step in range(6):
            observations.append(envs.step(non_eos_actions(envs, step))[0]["input_ids"])
        return np.stack(observations)

    np.testing.assert_array_equal(rollout(5), rollout(5))
    assert not np.array_equal(rollout(5), rollout(6))


def test_render_ansi(vec_kwargs):
    envs = IMDBContinuationVectorEnv(render_mode="ansi", **vec_kwargs)
    _, info = envs.reset(seed=0)
    assert envs.render() == tuple(info["prompt"])


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(num_envs=0), ValueError, "num_envs"),
        (dict(autoreset_mode="Disabled"), ValueError, "autoreset_mode"),
        (dict(autoreset_mode="sometimes"), ValueError, "sometimes"),
        (dict(not_a_kwarg=1), TypeError, "not_a_kwarg"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompts=[]), ValueError, "prompt"),
    ],
)
def test_bad_kwargs(vec_kwargs, bad, error, match):
    with pytest.raises(error, match=match):
        IMDBContinuationVectorEnv(**(vec_kwargs | bad))


def test_bad_actions_and_step_before_reset(vec_kwargs):
    envs = IMDBContinuationVectorEnv(**vec_kwargs)
    with pytest.raises(RuntimeError, match="reset"):
        envs.step(np.zeros(N, dtype=np.int64))
    envs.reset(seed=0)
    actions = non_eos_actions(envs, 0)
    actions[2] = envs.single_action_space.n
    with pytest.raises(ValueError, match="token id"):
        envs.step(actions)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_without_step_ref_logits_no_reference_forward_runs(vec_kwargs, mode):
    """``step_ref_logits=False``: same observations, rewards and prompts as the default env, no
    reference forward, no ``ref_logits``/``ref_logprob`` in the infos."""
    default = IMDBContinuationVectorEnv(autoreset_mode=mode, **vec_kwargs)
    lazy = IMDBContinuationVectorEnv(autoreset_mode=mode, step_ref_logits=False, **vec_kwargs)
    calls = []
    lazy.task.ref_model.register_forward_pre_hook(lambda *args: calls.append(1))
    (obs_a, info_a), (obs_b, info_b) = default.reset(seed=2), lazy.reset(seed=2)
    assert "ref_logits" not in info_b and list(info_a["prompt"]) == list(info_b["prompt"])
    for step in range(9):
        actions = non_eos_actions(default, step)
        if step in (1, 5):
            actions[2] = default.task.eos_id
        out_a, out_b = default.step(actions), lazy.step(actions)
        for a, b in zip(out_a[:4], out_b[:4]):
            np.testing.assert_equal(a, b)
        assert not {"ref_logits", "ref_logprob"} & set(out_b[4]) and not {"ref_logits", "ref_logprob"} & set(
            out_b[4].get("final_info", {})
        )
        assert set(out_b[4]) | {"ref_logits", "ref_logprob", "_ref_logits", "_ref_logprob"} >= set(out_a[4])
    assert calls == []


def test_reference_logits_of_whole_sequences_equal_unpadded_forwards(vec_kwargs):
    envs = IMDBContinuationVectorEnv(step_ref_logits=False, **vec_kwargs)
    obs, _ = envs.reset(seed=1)
    for step in range(3):
        obs = envs.step(non_eos_actions(envs, step))[0]
    ids, mask = torch.from_numpy(obs["input_ids"]), torch.from_numpy(obs["attention_mask"]).clone()
    mask[0, -1] = 0  # a position masked on the right leaves the earlier ones unchanged
    logits = envs.reference_logits(ids, mask, 3)
    assert logits.shape == (N, 3, envs.single_action_space.n) and logits.dtype == torch.float32
    for i in range(N):
        tokens = sequence(sub_obs(obs, i))
        for j in range(3 if i else 2):
            expected = reference_logits(envs.task.ref_model, tokens[: len(tokens) - 3 + j])
            np.testing.assert_allclose(logits[i, j].numpy(), expected, atol=1e-4, rtol=1e-4)
