"""The sampler draws the same tokens as ``torch.distributions.Categorical`` and as HF ``generate``.

``agents.rollout.categorical.sample_categorical`` replaces the distribution object in PPOKL's sampling
loop; it must not change a single token or log-probability under the same seed, so that runs
before and after the change (and against ``generate``) are comparable draw for draw.
"""
from __future__ import annotations

import pytest
import torch

from agents.rollout.categorical import sample_categorical
from agents.rollout.sampling import sample_episodes, trim_left_padding
from lmgym.assets import load_causal_lm
from lmgym.decoding import IncrementalDecoder
from tests.helpers.ppokl import make_env, make_model


@pytest.mark.parametrize("shape", [(1, 2), (5, 37), (24, 49_152)])
def test_sample_categorical_equals_categorical_bit_for_bit(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 4
    for seed in range(3):
        torch.manual_seed(seed)
        dist = torch.distributions.Categorical(logits=logits)
        expected = dist.sample()
        torch.manual_seed(seed)
        actions, logprobs = sample_categorical(logits)
        assert torch.equal(actions, expected)
        assert torch.equal(logprobs, dist.log_prob(expected))


def test_sample_categorical_generator_and_skewed_logits():
    logits = torch.full((3, 10), -1e4)
    logits[torch.arange(3), torch.tensor([2, 7, 9])] = 0.0
    actions, logprobs = sample_categorical(logits, torch.Generator().manual_seed(0))
    assert actions.tolist() == [2, 7, 9] and torch.allclose(logprobs, torch.zeros(3))


def generate(model, ids, mask, steps: int, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=steps, min_new_tokens=steps, pad_token_id=pad_id, eos_token_id=None)  # fmt: skip
    return out[:, ids.shape[1] :]


def test_decoder_loop_draws_the_tokens_of_generate(tiny_lm_path):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 13]])
    mask = (ids != 0).long()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = generate(model, ids, mask, 6, tokenizer.pad_token_id)
        torch.manual_seed(seed)
        decoder, tokens = IncrementalDecoder(model), []
        out = decoder.prefill(ids, mask)
        for t in range(6):
            actions, _ = sample_categorical(out.logits)
            tokens.append(actions)
            if t < 5:
                out = decoder.append(actions)
        assert torch.equal(torch.stack(tokens, 1), expected)


def test_sample_episodes_draws_the_tokens_of_generate(tiny_lm_path):
    """PPOKL's rollout sampler (unmasked) against ``generate`` on the same prompts and seed, over
    each episode up to its end (after an env's episode ends the two feed different tokens)."""
    env = make_env(tiny_lm_path, n_envs=4, max_new_tokens=5, step_ref_logits=False)
    model = make_model(tiny_lm_path, env)
    for seed in range(2):
        env.seed(seed)
        obs = env.reset()
        ids, mask = trim_left_padding(obs["input_ids"], obs["attention_mask"])
        torch.manual_seed(seed)
        steps = list(sample_episodes(model.policy, env, model.reference, ids, mask, env.max_new_tokens))
        torch.manual_seed(seed)
        expected = generate(model.policy.lm, ids, mask, len(steps), env.venv.task.pad_id)
        for t, step in enumerate(steps):
            assert torch.equal(step.actions[step.active], expected[step.active, t])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoder_loop_draws_the_tokens_of_generate_on_cuda(tiny_lm_path):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    model.cuda()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 13]]).cuda()
    mask = (ids != 0).long()
    torch.manual_seed(0)
    expected = generate(model, ids, mask, 6, tokenizer.pad_token_id)
    torch.manual_seed(0)
    decoder, tokens = IncrementalDecoder(model), []
    out = decoder.prefill(ids, mask)
    for t in range(6):
        tokens.append(sample_categorical(out.logits)[0])
        if t < 5:
            out = decoder.append(tokens[-1])
    assert torch.equal(torch.stack(tokens, 1), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cast_lm_head_to_fp32_on_cuda(tiny_lm_path):
    from agents.device import autocast_forward, fp32_output_layer

    model = load_causal_lm(tiny_lm_path)[0].cuda()
    autocast_forward(model, torch.bfloat16)
    fp32_output_layer(model)
    out = model(input_ids=torch.tensor([[5, 6, 7]]).cuda(), output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    expected = torch.nn.functional.linear(out.hidden_states[-1].float(), model.get_output_embeddings().weight)
    torch.testing.assert_close(out.logits, expected)
