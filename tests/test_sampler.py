"""The rollout's sampler draws from softmax(logits), and its decoder reproduces HF ``generate``.

``agents.rollout.categorical.sample_categorical`` draws by inverse CDF with one uniform per row
(not ``torch.multinomial``'s one exponential per vocabulary entry), so the same seed no longer gives
``generate``'s tokens. What is proven instead, separately:

- the draw is the inverse CDF of the whole row, computed in float64, for the same uniforms; so
  token ``i`` comes with probability ``softmax(logits)_i`` (and never at ``-inf``);
- the decoder's logits at every step equal ``generate``'s for the same tokens, and the rollout's
  log-probabilities equal those of a full forward over the sampled sequences.

``sampler="multinomial"`` (``sample_multinomial``) keeps the old draw, ``Categorical``'s bit for
bit: with it the rollout draws ``generate``'s tokens for the same seed.
"""
from __future__ import annotations

import pytest
import torch

from agents.rollout.categorical import BLOCK, first_above, sample_categorical, sample_multinomial
from agents.rollout.sampling import sample_episodes, trim_left_padding
from lmgym.assets import load_causal_lm
from lmgym.decoding import IncrementalDecoder, forward_last
from tests.helpers.ppokl import make_env, make_model


def full_row_inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The reference draw: the first token whose float64 cumulative weight exceeds ``u * total``."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp().double()
    cdf = weights.cumsum(-1)
    return (cdf <= u * cdf[:, -1:]).sum(-1)


@pytest.mark.parametrize("shape", [(1, 2), (5, 37), (7, 3 * BLOCK + 5), (24, 49_152)])
def test_sample_categorical_is_the_inverse_cdf_of_the_whole_row(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 4
    for seed in range(3):
        actions, logprobs = sample_categorical(logits, torch.Generator().manual_seed(seed))
        u = torch.rand(shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(actions, full_row_inverse_cdf(logits, u))
        # against float64: float32 log_softmax itself erred by up to 1.4e-5 at V 49,152 on an AVX2
        # machine, the draw's log-probs by at most 4.6e-7 (|log p| <= 10 here)
        expected = logits.double().log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs.double(), expected, rtol=0, atol=2e-6)
        assert logprobs.dtype == logits.dtype


def test_sample_categorical_frequencies_and_masked_tokens():
    """Four live tokens: the first and the last of a block, one inside a later block (a block
    between them has no mass at all) and the last of the vocabulary. Each is drawn with probability
    1/4 (within 5 standard errors over 40,000 rows), a masked token never."""
    vocab, live = 4 * BLOCK + 3, torch.tensor([0, BLOCK - 1, 2 * BLOCK + 7, 4 * BLOCK + 2])
    rows = 40_000
    logits = torch.full((rows, vocab), float("-inf"))
    logits[:, live] = 1.5
    actions, logprobs = sample_categorical(logits, torch.Generator().manual_seed(0))
    counts = torch.stack([(actions == i).sum() for i in live])
    assert int(counts.sum()) == actions.numel()
    sigma = (rows * (1 / 4) * (3 / 4)) ** 0.5
    assert ((counts - rows / 4).abs() < 5 * sigma).all(), counts
    torch.testing.assert_close(logprobs, torch.full_like(logprobs, -torch.log(torch.tensor(4.0)).item()))


def test_sample_categorical_generator_and_skewed_logits():
    logits = torch.full((3, 10), -1e4)
    logits[torch.arange(3), torch.tensor([2, 7, 9])] = 0.0
    actions, logprobs = sample_categorical(logits, torch.Generator().manual_seed(0))
    assert actions.tolist() == [2, 7, 9] and torch.allclose(logprobs, torch.zeros(3))


def test_first_above_never_lands_on_a_token_without_mass():
    cdf = torch.tensor([[0.0, 0.5, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)  # masses 0, .5, 0, .5, 0, 0
    found = [int(first_above(cdf, torch.tensor([[v]], dtype=torch.float64))) for v in (0.0, 0.49, 0.5, 0.99, 1.0, 1.5)]
    assert found == [1, 1, 3, 3, 3, 3]


@pytest.mark.parametrize("shape", [(1, 2), (5, 37), (24, 49_152)])
def test_sample_multinomial_equals_categorical_bit_for_bit(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 4
    for seed in range(3):
        torch.manual_seed(seed)
        dist = torch.distributions.Categorical(logits=logits)
        expected = dist.sample()
        torch.manual_seed(seed)
        actions, logprobs = sample_multinomial(logits)
        assert torch.equal(actions, expected)
        assert torch.equal(logprobs, dist.log_prob(expected))


def generate(model, ids, mask, steps: int, pad_id: int):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=steps, min_new_tokens=steps, pad_token_id=pad_id, eos_token_id=None,
                              return_dict_in_generate=True, output_logits=True)  # fmt: skip


def assert_decoder_gives_the_logits_of_generate(model, ids, mask, steps: int, pad_id: int) -> None:
    """Feed ``generate``'s sampled tokens to the decoder; its logits at every step equal
    ``generate``'s (the distributions both samplers draw from)."""
    torch.manual_seed(0)
    out = generate(model, ids, mask, steps, pad_id)
    tokens = out.sequences[:, ids.shape[1] :]
    decoder = IncrementalDecoder(model)
    step = decoder.prefill(ids, mask)
    for t in range(steps):
        torch.testing.assert_close(step.logits, out.logits[t].float(), rtol=1e-4, atol=1e-4)
        if t + 1 < steps:
            step = decoder.append(tokens[:, t])


def test_decoder_gives_the_logits_of_generate(tiny_lm_path):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 13]])
    assert_decoder_gives_the_logits_of_generate(model, ids, (ids != 0).long(), 6, tokenizer.pad_token_id)


def rollouts(tiny_lm_path, sampler: str):
    """PPOKL's rollout sampler (unmasked) on a 4-env tiny env, seeds 0 and 1: per seed, the policy
    and the prompts it sampled from (left padding trimmed) and the steps it took, drawn with
    ``sampler`` after ``torch.manual_seed(seed)``."""
    env = make_env(tiny_lm_path, n_envs=4, max_new_tokens=5, step_ref_logits=False)
    model = make_model(tiny_lm_path, env)
    for seed in range(2):
        env.seed(seed)
        obs = env.reset()
        ids, mask = trim_left_padding(obs["input_ids"], obs["attention_mask"])
        torch.manual_seed(seed)
        steps = list(sample_episodes(model.policy, env, model.reference, ids, mask, env.max_new_tokens, sampler=sampler))
        yield seed, model.policy.lm, env.venv.task.pad_id, ids, mask, steps


def test_sample_episodes_logprobs_are_the_policy_of_a_full_forward(tiny_lm_path):
    """Every recorded log pi(a_t | s_t), up to each episode's end, equals the one of one forward
    over the prompt and the sampled tokens."""
    for _, lm, _, ids, mask, steps in rollouts(tiny_lm_path, "inverse-cdf"):
        actions = torch.stack([step.actions for step in steps], 1)
        with torch.no_grad():
            logits = forward_last(lm, torch.cat([ids, actions], 1), torch.cat([mask, torch.ones_like(actions)], 1), len(steps) + 1).logits
        logprobs = logits[:, :-1].float().log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)
        for t, step in enumerate(steps):
            torch.testing.assert_close(step.logprobs[step.active], logprobs[step.active, t], rtol=0, atol=1e-4)


def test_sample_episodes_with_multinomial_draws_the_tokens_of_generate(tiny_lm_path):
    """``sampler="multinomial"`` against ``generate`` on the same prompts and seed, over each
    episode up to its end (after an env's episode ends the two feed different tokens)."""
    for seed, lm, pad_id, ids, mask, steps in rollouts(tiny_lm_path, "multinomial"):
        torch.manual_seed(seed)
        expected = generate(lm, ids, mask, len(steps), pad_id).sequences[:, ids.shape[1] :]
        for t, step in enumerate(steps):
            assert torch.equal(step.actions[step.active], expected[step.active, t])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoder_and_sampler_on_cuda(tiny_lm_path):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    model.cuda()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 13]]).cuda()
    assert_decoder_gives_the_logits_of_generate(model, ids, (ids != 0).long(), 6, tokenizer.pad_token_id)
    logits = torch.randn(24, 49_152, generator=torch.Generator().manual_seed(0)) * 4
    actions, _ = sample_categorical(logits.cuda(), torch.Generator("cuda").manual_seed(0))
    u = torch.rand(24, 1, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).cpu()
    assert torch.equal(actions.cpu(), full_row_inverse_cdf(logits, u))


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
