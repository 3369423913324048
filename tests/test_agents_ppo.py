"""PPOKL end to end on tiny random models: every KL configuration, equivalence with SB3's PPO
loss, the analytic KL gradient, save/load, seeding, and the KL-regularised optimum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer

import kl_estimators
from agents import PPOKL
from agents.algorithm import masked_mean
from tests.helpers.ppokl import make_env, make_model, one_rollout

CONFIGS = [
    {"kl_reward": kind, "analytic_grad": grad} for kind in ("k1", "k2", "k3", "analytic", "none") for grad in (False, True)
] + [{"kl_reward": "k1", "kl_loss": loss} for loss in ("k1-loss", "k2-loss", "k3-loss")] + [
    {"kl_reward": "analytic", "analytic_grad": True, "kl_target": 0.5}
]


@pytest.mark.filterwarnings("ignore:kl_reward='analytic' without analytic_grad")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_one_iteration_runs_for_every_kl_configuration(tiny_lm_path, config):
    model = make_model(tiny_lm_path, **config)
    before = [p.detach().clone() for p in model.policy.lm.parameters()]
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    assert model.n_iterations == 1
    logged = model.logger.name_to_value
    for key in ("train/loss", "train/policy_gradient_loss", "train/kl_loss", "train/approx_kl", "train/clip_fraction"):
        assert np.isfinite(logged[key]), key
    assert model.rollout_stats["rollout/kl_analytic"] >= -1e-6
    expects_kl_term = config.get("analytic_grad") or config.get("kl_loss")
    assert (logged["train/kl_loss"] != 0) == bool(expects_kl_term)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.lm.parameters()))


def test_analytic_reward_without_analytic_grad_warns_of_its_bias(tiny_lm_path):
    env = make_env(tiny_lm_path)
    with pytest.warns(UserWarning, match="biased KL gradient"):
        make_model(tiny_lm_path, env, kl_reward="analytic")


def test_incompatible_options_are_rejected(tiny_lm_path, tiny_lm_other_vocab_path):
    env = make_env(tiny_lm_path)
    with pytest.raises(ValueError, match="kl_reward"):
        make_model(tiny_lm_path, env, kl_reward="k4")
    with pytest.raises(ValueError, match="kl_loss"):
        make_model(tiny_lm_path, env, kl_loss="k5-loss")
    with pytest.raises(ValueError, match="choose one"):
        make_model(tiny_lm_path, env, analytic_grad=True, kl_loss="k3-loss")
    with pytest.raises(ValueError, match="vocabulary"):
        make_model(tiny_lm_other_vocab_path, env, analytic_grad=True)


def sb3_buffer_from(model: PPOKL) -> DictRolloutBuffer:
    """The same transitions as PPOKL's sequence buffer, one per generated token, in SB3's flat
    buffer; each observation is the left-padded prefix s_t."""
    buffer = model.rollout_buffer
    rows, steps = torch.nonzero(buffer.mask, as_tuple=True)
    length = model.observation_space["input_ids"].shape[0]
    sb3 = DictRolloutBuffer(len(rows), model.observation_space, model.action_space, n_envs=1, gamma=1, gae_lambda=1)
    for row, t in zip(rows.tolist(), steps.tolist()):
        ids = torch.cat([buffer.prompt_ids[row], buffer.actions[row, :t]])
        mask = torch.cat([buffer.prompt_mask[row], torch.ones(t, dtype=torch.long)])
        pad = length - len(ids)
        obs = {
            "input_ids": np.pad(ids.numpy(), (pad, 0))[None],
            "attention_mask": np.pad(mask.numpy(), (pad, 0))[None],
        }
        sb3.add(
            obs,
            np.array([[buffer.actions[row, t].item()]]),
            np.zeros(1),
            np.zeros(1),
            buffer.values[row, t].reshape(1),
            buffer.logprobs[row, t].reshape(1),
        )
    sb3.advantages[:, 0] = buffer.advantages[rows, steps].numpy()
    sb3.returns[:, 0] = buffer.returns[rows, steps].numpy()
    return sb3


def test_loss_equals_sb3_ppo_loss_when_beta_is_zero(tiny_lm_path):
    """beta = 0, no analytic gradient: PPOKL's sequence-batched loss is SB3's PPO loss computed
    by SB3's own ``PPO.train`` on the same transitions, one observation at a time."""
    model = make_model(tiny_lm_path, kl_coef=0.0, n_epochs=1, batch_size=10_000, ent_coef=0.01, learning_rate=0.0)
    one_rollout(model)
    buffer = model.rollout_buffer
    ours = model.ppo_losses(buffer.sequences(torch.arange(model.n_envs)), clip_range=0.2, clip_range_vf=None)
    model.rollout_buffer = sb3_buffer_from(model)
    PPO.train(model)
    assert model.logger.name_to_value["train/loss"] == pytest.approx(ours["loss"].item(), rel=1e-4, abs=1e-6)
    assert model.logger.name_to_value["train/value_loss"] == pytest.approx(ours["value_loss"].item(), rel=1e-4)
    assert model.logger.name_to_value["train/entropy_loss"] == pytest.approx(ours["entropy_loss"].item(), rel=1e-4)


def test_analytic_kl_term_gradient_is_autograd_of_kl_estimators_analytic(tiny_lm_path):
    model = make_model(tiny_lm_path, analytic_grad=True, kl_reward="analytic", kl_coef=0.3)
    one_rollout(model)
    batch = model.rollout_buffer.sequences(torch.arange(model.n_envs))
    logits, _ = model.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
    logits = logits.detach().requires_grad_(True)
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    (grad_ours,) = torch.autograd.grad(model.kl_loss_term(batch, logits, logprobs), logits)
    exact = 0.3 * masked_mean(kl_estimators.analytic(logits, batch.ref_logits), batch.mask.float())
    (grad_exact,) = torch.autograd.grad(exact, logits)
    assert grad_exact.abs().sum() > 0
    torch.testing.assert_close(grad_ours, grad_exact, rtol=1e-5, atol=1e-8)


def test_rollout_logprobs_match_training_forward(tiny_lm_path):
    """The KV-cached sampler and the full-sequence forward give the same log-probs and values,
    so the first PPO ratio is exactly 1."""
    model = make_model(tiny_lm_path)
    one_rollout(model)
    buffer = model.rollout_buffer
    batch = buffer.sequences(torch.arange(model.n_envs))
    with torch.no_grad():
        logits, values = model.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs * batch.mask, batch.old_logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values * batch.mask, batch.old_values, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_gives_identical_predictions(tiny_lm_path, tmp_path):
    model = make_model(tiny_lm_path, analytic_grad=True, kl_reward="analytic", kl_target=0.01)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    obs = model.env.reset()
    expected_actions, _ = model.predict(obs, deterministic=True)
    expected_values = model.policy.predict_values(model.policy.obs_to_tensor(obs)[0])
    model.save(tmp_path / "model.safetensors")
    loaded = PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path))
    actions, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, expected_actions)
    torch.testing.assert_close(loaded.policy.predict_values(loaded.policy.obs_to_tensor(obs)[0]), expected_values)
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert (loaded.n_iterations, loaded.analytic_grad, loaded.kl_reward) == (1, True, "analytic")
    assert loaded.kl_controller.value == model.kl_controller.value != 0.1  # the adaptive beta moved


def first_iteration_metrics(model_path: str, seed: int) -> dict[str, float]:
    model = make_model(model_path, seed=seed, analytic_grad=True)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    logged = model.logger.name_to_value
    return {**model.rollout_stats, **{k: logged[k] for k in ("train/loss", "train/approx_kl", "train/value_loss")}}


def test_same_seed_gives_identical_first_iteration(tiny_lm_path):
    first = first_iteration_metrics(tiny_lm_path, seed=3)
    again = first_iteration_metrics(tiny_lm_path, seed=3)
    other = first_iteration_metrics(tiny_lm_path, seed=4)
    first.pop("time/rollout_tokens_per_s"), again.pop("time/rollout_tokens_per_s"), other.pop("time/rollout_tokens_per_s")
    assert first == again
    assert first != other


def test_non_finite_loss_stops_training_with_a_clear_error(tiny_lm_path):
    model = make_model(tiny_lm_path, analytic_grad=True)
    one_rollout(model)
    with torch.no_grad():
        model.policy.value_head[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite PPO loss"):
        model.train()
