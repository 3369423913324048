"""LoRA (``lora_rank``): the reference is the policy's own network with its adapters off."""
from __future__ import annotations

import pytest
import torch

from agents.lora import BaseModelView, share_base_as_reference
from agents.rollout.reference import Reference
from lmgym.assets import load_causal_lm
from tests.helpers.ppokl import make_model
from tests.helpers.ppokl import one_rollout

pytest.importorskip("peft")

KL_CONFIG = {"analytic_grad": True, "kl_reward": "analytic", "kl_coef": 0.3, "learning_rate": 1e-2}


def lora_model(model_path: str, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs):
    policy_kwargs = {"lora_rank": 4, "optimizer_class": optimizer_class}
    model = make_model(model_path, policy_kwargs=policy_kwargs, **KL_CONFIG, **kwargs)
    share_base_as_reference(model, [model.env])
    return model


def test_lora_policy_starts_equal_to_its_reference_then_moves_only_its_adapters(tiny_lm_path):
    model = lora_model(tiny_lm_path)
    ref = model.reference.model
    assert model.env.reference_model is ref, "the env's per-step pi_ref is the same view"
    assert isinstance(ref, BaseModelView) and ref.lm is model.policy.lm and not list(ref.parameters())
    base = {n: p.detach().clone() for n, p in model.policy.lm.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.policy.lm.named_parameters() if "lora_" in n}
    assert adapters and all(not p.requires_grad for n, p in model.policy.lm.named_parameters() if n in base)

    one_rollout(model)  # B = 0 at initialisation: the same logits, bit for bit
    buffer = model.rollout_buffer
    assert torch.equal(buffer.analytic_kl, torch.zeros_like(buffer.analytic_kl))
    # (sampler and env take log-probs with different torch functions: equal up to rounding)
    torch.testing.assert_close(buffer.logprobs[buffer.mask], buffer.ref_logprobs[buffer.mask], rtol=1e-6, atol=1e-6)

    model.train()
    one_rollout(model)
    assert float(model.rollout_buffer.analytic_kl.sum()) > 0
    for name, parameter in model.policy.lm.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), name
    assert any(not torch.equal(p, adapters[n]) for n, p in model.policy.lm.named_parameters() if n in adapters)

    # the adapter-free network is the model on disk
    batch = model.rollout_buffer.sequences(torch.arange(model.n_envs))
    on_disk, _ = load_causal_lm(tiny_lm_path)
    n_actions = batch.actions.shape[1]
    torch.testing.assert_close(
        Reference(ref).logits(batch.input_ids, batch.attention_mask, n_actions),
        Reference(on_disk).logits(batch.input_ids, batch.attention_mask, n_actions),
    )


@pytest.mark.parametrize("other", ["recompute", "hidden"])
def test_lora_with_recomputed_or_hidden_reference_trains_like_stored(tiny_lm_path, other):
    """``hidden``: the reference's hidden states come from the base model (adapters off) and its
    output layer is the policy's own."""
    runs = []
    for mode in ("store", other):
        # SGD: with Adam, rounding noise in near-zero gradients moves parameters by up to lr
        model = lora_model(tiny_lm_path, optimizer_class=torch.optim.SGD, ref_logits=mode)
        model.learn(total_timesteps=2 * model.n_envs * model.n_steps)
        runs.append([p.detach().clone() for p in model.policy.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_lora_rank_is_a_clear_error(tiny_lm_path, capsys):
    from agents.cli.config import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lora-rank", "-1"])
    assert exit_info.value.code == 2 and "--lora-rank must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        make_model(tiny_lm_path, policy_kwargs={"lora_rank": -2})
