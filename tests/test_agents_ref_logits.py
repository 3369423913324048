"""``ref_logits="recompute"`` and ``"hidden"``: no [N, T, V] storage, and the same training as ``"store"``."""
from __future__ import annotations

import pytest
import torch

from agents.rollout.reference import linear_logits, memory_bytes, reference_hidden
from lmgym.decoding import forward_last
from tests.helpers.ppokl import make_env, make_model

KL_CONFIG = {"analytic_grad": True, "kl_reward": "analytic", "kl_coef": 0.3, "seed": 5}


def test_recompute_buffer_stores_no_reference_logits_and_recomputes_the_stored_ones(tiny_lm_path):
    models = {}
    for mode in ("store", "recompute"):  # seeding happens in the constructor: roll out before the next
        model = models[mode] = make_model(tiny_lm_path, ref_logits=mode, **KL_CONFIG)
        _, callback = model.setup_learn(total_timesteps=10**6, callback=None)
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    stored, recomputed = models["store"], models["recompute"]
    assert recomputed.rollout_buffer.ref_logits is None
    every = torch.arange(stored.n_envs)
    batch = stored.rollout_buffer.sequences(every)
    assert recomputed.rollout_buffer.sequences(every).ref_logits is None
    torch.testing.assert_close(recomputed.rollout_buffer.sequences(every).input_ids, batch.input_ids)
    again = stored.reference.with_logits(batch)
    mask = batch.mask
    assert mask.any()
    torch.testing.assert_close(again.ref_logits[mask], batch.ref_logits[mask], rtol=1e-5, atol=1e-5)


def test_hidden_buffer_stores_the_reference_hidden_states_that_give_the_stored_logits(tiny_lm_path):
    models = {}
    for mode in ("store", "hidden"):
        model = models[mode] = make_model(tiny_lm_path, ref_logits=mode, **KL_CONFIG)
        _, callback = model.setup_learn(total_timesteps=10**6, callback=None)
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    every = torch.arange(models["store"].n_envs)
    stored, hidden = models["store"].rollout_buffer.sequences(every), models["hidden"].rollout_buffer.sequences(every)
    assert hidden.ref_logits is None and stored.ref_hidden is None
    ref_model = models["hidden"].env.get_attr("task")[0].ref_model
    assert hidden.ref_hidden.shape == (*hidden.mask.shape, ref_model.config.hidden_size)
    logits = linear_logits(ref_model, hidden.ref_hidden).materialise()
    mask = stored.mask
    assert mask.any()
    torch.testing.assert_close(logits[mask], stored.ref_logits[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, extra", [("recompute", {}), ("hidden", {}), ("hidden", {"ent_coef": 0.05}), ("hidden", {"analytic_grad": False, "kl_reward": "k1", "kl_loss": "k3-loss"})])
def test_same_seed_gives_the_same_metrics_and_parameters_as_store(tiny_lm_path, mode, extra):
    """Two iterations (rollout + 2 epochs of minibatch updates each): the only difference between
    the modes is float rounding (a full forward vs the env's KV-cached one; the fused KL's chunked
    sums vs the materialised logits')."""
    runs = {}
    for mode in ("store", mode):
        # SGD: Adam's first step is ~lr x sign(g), so rounding noise in near-zero gradient
        # coordinates would move parameters by up to lr; SGD moves them by lr x noise.
        config = {**KL_CONFIG, **extra}
        model = make_model(tiny_lm_path, ref_logits=mode, policy_kwargs={"optimizer_class": torch.optim.SGD}, **config)
        model.learn(total_timesteps=2 * model.n_envs * model.n_steps)
        logged = model.logger.name_to_value
        metrics = {k: v for k, v in {**logged, **model.rollout_stats}.items() if not k.startswith("time/")}
        runs[mode] = (metrics, [p.detach().clone() for p in model.policy.parameters()])
    (store_metrics, store_params), (other_metrics, other_params) = runs["store"], runs[mode]
    assert store_metrics.keys() == other_metrics.keys()
    assert store_metrics["train/kl_loss"] != 0
    for key, value in store_metrics.items():
        assert other_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for a, b in zip(store_params, other_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_memory_formulas_of_every_mode():
    """Doubling the minibatch's positions doubles the update's vocabulary-wide memory in ``store``
    and ``recompute`` and leaves ``hidden``'s (one chunk) unchanged; ``hidden``'s buffer is V / d
    times smaller than ``store``'s and ``recompute`` keeps none."""
    sizes = dict(n=24, t=16, vocab=49_152, hidden_size=576, b=8, chunk=64)
    for mode in ("store", "recompute", "hidden"):
        small, large = memory_bytes(mode, **sizes), memory_bytes(mode, **{**sizes, "b": 16})
        assert large["update"] == (small["update"] if mode == "hidden" else 2 * small["update"])
    store, recompute, hidden = (memory_bytes(mode, **sizes)["buffer"] for mode in ("store", "recompute", "hidden"))
    assert recompute == 0 and store == hidden * 49_152 // 576
    with pytest.raises(ValueError, match="ref_logits must be one of"):
        memory_bytes("disk", **sizes)


def count_output_layer_rows(model: torch.nn.Module) -> list[int]:
    """The number of positions each call of ``model``'s output layer computes logits for (appended as called)."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(out.shape[:-1].numel()))
    return rows


@pytest.mark.parametrize("step_ref_logits", [False, True])
def test_hidden_rollout_scores_the_reference_once_and_never_computes_its_logits_over_the_rollout(tiny_lm_path, step_ref_logits):
    """The env that scores pi_ref after sampling (PPOKL's CLI) gives the hidden states from its one
    forward, whose output layer computes one position per row; an env that gives pi_ref's logits
    per step (lmgym's default) computes them anyway, and the hidden states take one more forward."""
    env = make_env(tiny_lm_path, step_ref_logits=step_ref_logits)
    model = make_model(tiny_lm_path, env=env, ref_logits="hidden", **KL_CONFIG)
    ref_model = env.get_attr("task")[0].ref_model
    rows = count_output_layer_rows(ref_model)
    _, callback = model.setup_learn(total_timesteps=10**6, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    if step_ref_logits:
        assert len(rows) > buffer.n_steps and rows[-1] == model.n_envs  # the env's per-step forwards, then the hidden one
    else:
        assert rows == [model.n_envs]  # one forward, logits at its last position only
    logits = linear_logits(ref_model, buffer.ref_hidden).materialise()
    mask = buffer.mask
    assert mask.any() and buffer.ref_hidden.shape == (*mask.shape, ref_model.config.hidden_size)
    expected = torch.log_softmax(logits, -1).gather(-1, buffer.actions.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(buffer.ref_logprobs[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_reference_hidden_keeps_only_the_last_layer_and_equals_every_layer_path(tiny_lm_path):
    """``reference_hidden`` catches the decoder's last hidden state: the model is never asked for
    every layer's states, and the result equals the last of them (the path it replaced)."""
    env = make_env(tiny_lm_path)
    ref_model = env.get_attr("task")[0].ref_model
    asked: list[dict] = []
    handle = ref_model.register_forward_pre_hook(lambda _module, _args, kwargs: asked.append(kwargs), with_kwargs=True)
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    try:
        hidden = reference_hidden(ref_model, ids, mask, 3)
    finally:
        handle.remove()
    assert len(asked) == 1 and not asked[0].get("output_hidden_states") and asked[0]["logits_to_keep"] == 1
    every_layer = forward_last(ref_model, ids, mask, 1, output_hidden_states=True).hidden_states[-1][:, -4:-1]
    torch.testing.assert_close(hidden, every_layer.float())
    assert hidden.shape == (2, 3, ref_model.config.hidden_size)


def test_reference_hidden_of_a_model_without_a_separate_decoder(tiny_lm_path, monkeypatch):
    """A model that is its own decoder falls back to the last of every layer's hidden states."""
    ref_model = make_env(tiny_lm_path).get_attr("task")[0].ref_model
    ids, mask = torch.tensor([[3, 4, 5, 6, 7]]), torch.ones(1, 5, dtype=torch.long)
    expected = reference_hidden(ref_model, ids, mask, 2)
    monkeypatch.setattr(ref_model, "get_decoder", lambda: ref_model)
    torch.testing.assert_close(reference_hidden(ref_model, ids, mask, 2), expected)
