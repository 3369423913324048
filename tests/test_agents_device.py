"""Device and precision: the CUDA check, bfloat16 autocast on CPU, activation checkpointing, and
the whole loop on a GPU where one is present (skipped otherwise)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import PPOKL
from agents.cli.config import parse_args
from agents.device import checkpointed_layers, device_error
from agents.cli.evaluation import evaluate
from tests.helpers.ppokl import make_env, make_model
from tests.helpers.ppokl import one_rollout

KL_CONFIG = {"analytic_grad": True, "kl_reward": "analytic", "kl_coef": 0.3}


def test_cuda_without_cuda_is_a_one_line_error_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = device_error("cuda")
    assert error is not None and error.startswith("--device cuda: CUDA is not available") and "\n" not in error
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert device_error("cpu") is None
    assert "not a torch device" in device_error("gpu0")


def lm_head_dtypes(model: PPOKL) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.policy.lm.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_bfloat16_runs_the_lm_under_autocast_with_float32_weights_and_kl(tiny_lm_path):
    model = make_model(tiny_lm_path, policy_kwargs={"dtype": "bfloat16"}, **KL_CONFIG)
    seen = lm_head_dtypes(model)
    before = [p.detach().clone() for p in model.policy.lm.parameters()]
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    assert seen and set(seen) == {torch.bfloat16}  # rollout and update forwards both in bfloat16
    assert all(p.dtype == torch.float32 for p in model.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.lm.parameters()))
    batch = model.rollout_buffer.sequences(torch.arange(model.n_envs))
    logits, values = model.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
    assert logits.dtype == values.dtype == torch.float32
    for key in ("train/loss", "train/kl_loss", "train/approx_kl"):
        assert np.isfinite(model.logger.name_to_value[key]), key


def lm_gradients(model: PPOKL) -> list[torch.Tensor]:
    model.policy.set_training_mode(True)
    model.policy.optimizer.zero_grad()
    batch = model.rollout_buffer.sequences(torch.arange(model.n_envs))
    model.ppo_losses(batch, clip_range=0.2, clip_range_vf=None)["loss"].backward()
    return [p.grad.clone() for p in model.policy.lm.parameters() if p.grad is not None]


def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradient(tiny_lm_path):
    plain = make_model(tiny_lm_path, **KL_CONFIG)
    checkpointed = make_model(tiny_lm_path, policy_kwargs={"gradient_checkpointing": True}, **KL_CONFIG)
    layers = checkpointed_layers(checkpointed.policy.lm)
    assert len(layers) == 2  # the tiny Llama's two decoder layers
    one_rollout(plain)
    checkpointed.rollout_buffer = plain.rollout_buffer  # the same weights (one file) and sequences
    calls: list[str] = []
    inner = next(layers[0].children())  # hooks on the layer itself stay outside the checkpoint
    inner.register_forward_hook(lambda *_: calls.append("forward"))
    expected = lm_gradients(plain)
    got = lm_gradients(checkpointed)
    assert calls == ["forward", "forward"]  # once in forward, once recomputed in backward
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    checkpointed.policy.set_training_mode(False)
    assert not any(layer.training for layer in layers)
    assert not any(m.training for m in checkpointed.policy.lm.modules() if m not in layers)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ref_logits", ["store", "recompute", "hidden"])
def test_cuda_rollout_update_evaluation_checkpoint_and_resume(tiny_lm_path, tmp_path, dtype, ref_logits):
    env = make_env(tiny_lm_path, device="cuda")
    model = make_model(tiny_lm_path, env, device="cuda", ref_logits=ref_logits, policy_kwargs={"dtype": dtype}, **KL_CONFIG)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    assert model.policy.device.type == "cuda"
    assert np.isfinite(model.logger.name_to_value["train/loss"])
    assert np.isfinite(evaluate(model.policy, make_env(tiny_lm_path, device="cuda"), model.reference).perplexity)
    model.save(tmp_path / "model.safetensors")
    loaded = PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path, device="cuda"), device="cuda")
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b)
    loaded.learn(total_timesteps=loaded.n_envs * loaded.n_steps, reset_num_timesteps=False)
    assert loaded.n_iterations == 2


def test_cast_lm_head_to_fp32_gives_float32_logits_of_the_bfloat16_trunk(tiny_lm_path):
    """Under bfloat16 autocast with ``cast_lm_head_to_fp32`` the output layer runs in float32 on the
    trunk's hidden states (exactly an fp32 linear of them), the weights get gradients, and a
    bfloat16-stored frozen model's head also returns float32 logits."""
    from agents.device import cast_frozen, fp32_output_layer
    from lmgym.assets import load_causal_lm

    model = make_model(tiny_lm_path, policy_kwargs={"dtype": "bfloat16", "cast_lm_head_to_fp32": True}, **KL_CONFIG)
    lm = model.policy.lm
    seen = lm_head_dtypes(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = lm(input_ids=ids, output_hidden_states=True)
    head = lm.get_output_embeddings()
    assert seen == [torch.float32] and out.logits.dtype == torch.float32
    expected = torch.nn.functional.linear(out.hidden_states[-1].float(), head.weight)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    out.logits.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert model.policy._get_constructor_parameters()["cast_lm_head_to_fp32"] is True
    frozen = load_causal_lm(tiny_lm_path)[0]
    cast_frozen(frozen, torch.bfloat16)
    fp32_output_layer(fp32_output_layer(frozen))  # idempotent
    with torch.no_grad():
        frozen_out = frozen(input_ids=ids, output_hidden_states=True)
    assert frozen_out.logits.dtype == torch.float32
    w = frozen.get_output_embeddings().weight.float()
    torch.testing.assert_close(frozen_out.logits, frozen_out.hidden_states[-1].float() @ w.T, rtol=0, atol=0)


def test_bfloat16_on_a_cpu_that_emulates_it_is_warned_about():
    from agents.device import cpu_has_native_bf16, precision_warning

    emulating = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    native = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert cpu_has_native_bf16(emulating) is False and cpu_has_native_bf16(native) is True
    assert cpu_has_native_bf16("model name : Apple M2\n") is None  # no flags line: unknown, no warning
    warning = precision_warning("cpu", "bfloat16", emulating)
    assert warning.startswith("warning: --dtype bfloat16") and "\n" not in warning
    assert precision_warning("cpu", "bfloat16", native) is None
    assert precision_warning("cpu", "float32", emulating) is None
    assert precision_warning("cuda", "bfloat16", emulating) is None
