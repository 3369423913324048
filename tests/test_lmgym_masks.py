"""Action masks: top-k / top-p against a brute-force computation, and the envs' ``action_masks()``."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.env import IMDBContinuationEnv
from lmgym.masks import top_k_top_p_mask
from lmgym.vector_env import IMDBContinuationVectorEnv

from tests.helpers.lmgym import reference_logits, sequence


def brute_force_mask(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """One row, by the definition: rank tokens by (-logit, id); keep rank < k and the tokens whose
    strictly-more-probable mass is < p (in float64, from the same float32 probabilities)."""
    probs = torch.from_numpy(logits).float().softmax(-1).double().numpy()
    order = sorted(range(len(logits)), key=lambda v: (-float(logits[v]), v))
    keep = np.zeros(len(logits), dtype=bool)
    mass = 0.0
    for rank, v in enumerate(order):
        keep[v] = (top_k is None or rank < top_k) and (top_p is None or mass < top_p)
        mass += probs[v]
    return keep


@settings(deadline=None, max_examples=150)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 12)), elements=st.floats(-8, 8, width=32)),
    st.one_of(st.none(), st.integers(1, 14)),
    st.one_of(st.none(), st.sampled_from([0.1, 0.3, 0.5, 0.9, 0.97, 1.0])),
)
def test_mask_matches_brute_force(logits, top_k, top_p):
    got = top_k_top_p_mask(torch.from_numpy(logits), top_k, top_p).numpy()
    # the float32 cumsum may differ from the float64 one by rounding: only compare away from the boundary
    expected = np.stack([brute_force_mask(row, top_k, top_p) for row in logits])
    probs = torch.from_numpy(logits).softmax(-1).double().numpy()
    for row, (g, e, p) in enumerate(zip(got, expected, probs)):
        order = sorted(range(len(p)), key=lambda v: (-float(logits[row, v]), v))
        before = np.cumsum([p[v] for v in order]) - [p[v] for v in order]
        near = top_p is not None and np.any(np.abs(before - top_p) < 1e-5)
        if not near:
            np.testing.assert_array_equal(g, e)
        assert g.any(), "a mask is never empty"
        assert g.sum() <= (top_k or len(p))
        if top_p is not None and top_k is None and not near:
            assert p[g].sum() >= top_p - 1e-6, "the nucleus holds at least top_p of the mass"


def test_mask_off_and_bad_options():
    logits = torch.randn(2, 5)
    assert top_k_top_p_mask(logits).all()
    with pytest.raises(ValueError, match="top_p"):
        top_k_top_p_mask(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        top_k_top_p_mask(logits, top_k=0)


@pytest.fixture
def kwargs(tiny_lm_path, tiny_prompts):
    return dict(model=tiny_lm_path, prompts=tiny_prompts, max_prompt_tokens=6, max_new_tokens=4)


def test_single_env_masks_off_by_default(kwargs):
    env = gym.make("IMDBContinuation-v0", **kwargs)
    env.reset(seed=0)
    assert is_masking_supported(env)
    masks = get_action_masks(env)
    assert masks.shape == (env.action_space.n,) and masks.dtype == bool and masks.all()
    assert env.unwrapped.masks_actions is False


@pytest.mark.parametrize("top_k,top_p", [(None, 0.5), (3, None), (5, 0.9)])
def test_single_env_masks_from_reference(kwargs, top_k, top_p):
    env = IMDBContinuationEnv(mask_top_k=top_k, mask_top_p=top_p, **kwargs)
    assert env.masks_actions is True
    obs, _ = env.reset(seed=1)
    for step in range(4):
        masks = env.action_masks()
        logits = reference_logits(env.task.ref_model, sequence(obs))  # an unpadded full forward
        np.testing.assert_array_equal(masks, brute_force_mask(logits, top_k, top_p))
        action = int(np.flatnonzero(masks)[-1])
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break


def test_single_env_masks_from_a_masking_model(kwargs, tiny_gpt2_path):
    from lmgym.assets import load_causal_lm

    other = load_causal_lm(tiny_gpt2_path)[0].eval()
    env = IMDBContinuationEnv(mask_top_p=0.6, mask_model=other, **kwargs)
    obs, _ = env.reset(seed=2)
    np.testing.assert_array_equal(env.action_masks(), brute_force_mask(reference_logits(other, sequence(obs)), None, 0.6))


@pytest.mark.parametrize("step_ref_logits", [True, False])
def test_vector_env_masks_from_reference(kwargs, step_ref_logits):
    n = 3
    envs = IMDBContinuationVectorEnv(num_envs=n, step_ref_logits=step_ref_logits, mask_top_p=0.7, autoreset_mode="SameStep", **kwargs)
    obs, _ = envs.reset(seed=0)
    for step in range(6):  # crosses an autoreset
        masks = envs.action_masks()
        assert masks.shape == (n, envs.single_action_space.n) and masks.dtype == bool
        for i in range(n):
            tokens = sequence({key: value[i] for key, value in obs.items()})
            np.testing.assert_array_equal(masks[i], brute_force_mask(reference_logits(envs.task.ref_model, tokens), None, 0.7))
        actions = np.array([np.flatnonzero(row)[0] for row in masks])
        obs, *_ = envs.step(actions)


def test_vector_env_logits_fn_and_sb3_contrib_reads_rows(kwargs):
    from agents.vec_env import LMGymVecEnv

    seen, vocab = [], {}

    def logits_fn(input_ids, attention_mask):
        seen.append(input_ids.shape)
        n, v = input_ids.shape[0], vocab["n"]
        return torch.arange(n * v, dtype=torch.float32).reshape(n, v) % 7

    envs = gym.make_vec(
        "IMDBContinuation-v0", num_envs=2, vectorization_mode="vector_entry_point", autoreset_mode="SameStep",
        mask_top_k=2, mask_logits_fn=logits_fn, **kwargs,
    )
    vocab["n"] = envs.unwrapped.single_action_space.n
    venv = LMGymVecEnv(envs.unwrapped)
    venv.reset()
    masks = get_action_masks(venv)
    expected = np.stack([brute_force_mask(row.numpy(), 2, None) for row in logits_fn(torch.zeros(2, 1), None)])
    assert masks.shape == (2, vocab["n"]) and seen
    np.testing.assert_array_equal(masks, expected)


def test_unmasked_vector_env_allows_everything(kwargs):
    envs = IMDBContinuationVectorEnv(num_envs=2, **kwargs)
    with pytest.raises(RuntimeError, match="reset"):
        envs.action_masks()
    envs.reset(seed=0)
    assert envs.action_masks().all()
