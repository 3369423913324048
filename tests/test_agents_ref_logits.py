"""``ref_logits="recompute"``: no [N, T, V] storage, and the same training as ``"store"``."""
from __future__ import annotations

import pytest
import torch

from agents.reference import with_reference_logits
from tests.agents_helpers import make_env, make_model

KL_CONFIG = {"analytic_grad": True, "kl_reward": "analytic", "kl_coef": 0.3, "seed": 5}


def test_recompute_buffer_stores_no_reference_logits_and_recomputes_the_stored_ones(tiny_lm_path):
    models = {}
    for mode in ("store", "recompute"):  # seeding happens in the constructor: roll out before the next
        model = models[mode] = make_model(tiny_lm_path, ref_logits=mode, **KL_CONFIG)
        _, callback = model._setup_learn(total_timesteps=10**6, callback=None)
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    stored, recomputed = models["store"], models["recompute"]
    assert recomputed.rollout_buffer.ref_logits is None
    every = torch.arange(stored.n_envs)
    batch = stored.rollout_buffer.sequences(every)
    assert recomputed.rollout_buffer.sequences(every).ref_logits is None
    torch.testing.assert_close(recomputed.rollout_buffer.sequences(every).input_ids, batch.input_ids)
    again = with_reference_logits(batch, stored.env.get_attr("task")[0].ref_model)
    mask = batch.mask
    assert mask.any()
    torch.testing.assert_close(again.ref_logits[mask], batch.ref_logits[mask], rtol=1e-5, atol=1e-5)


def test_same_seed_gives_the_same_metrics_and_parameters_in_both_modes(tiny_lm_path):
    """Two iterations (rollout + 2 epochs of minibatch updates each): the only difference between
    the modes is the float rounding of a full forward vs the env's KV-cached one."""
    runs = {}
    for mode in ("store", "recompute"):
        # SGD: Adam's first step is ~lr x sign(g), so rounding noise in near-zero gradient
        # coordinates would move parameters by up to lr; SGD moves them by lr x noise.
        model = make_model(tiny_lm_path, ref_logits=mode, policy_kwargs={"optimizer_class": torch.optim.SGD}, **KL_CONFIG)
        model.learn(total_timesteps=2 * model.n_envs * model.n_steps)
        logged = model.logger.name_to_value
        metrics = {k: v for k, v in {**logged, **model.rollout_stats}.items() if not k.startswith("time/")}
        runs[mode] = (metrics, [p.detach().clone() for p in model.policy.parameters()])
    (store_metrics, store_params), (recompute_metrics, recompute_params) = runs["store"], runs["recompute"]
    assert store_metrics.keys() == recompute_metrics.keys()
    assert store_metrics["train/kl_loss"] != 0
    for key, value in store_metrics.items():
        assert recompute_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for a, b in zip(store_params, recompute_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_mode_is_rejected(tiny_lm_path):
    with pytest.raises(ValueError, match="ref_logits must be one of"):
        make_model(tiny_lm_path, make_env(tiny_lm_path), ref_logits="disk")
