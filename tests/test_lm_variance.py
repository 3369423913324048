"""``studies.lm_variance``: the output-layer gradient statistics, and the command on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kl_estimators
import studies.lm_variance as lmv
from lmgym.assets import load_causal_lm
from studies.lm_variance_report import statistics


def test_output_layer_statistics_are_the_materialised_block():
    """exact = |G|_F^2 and projected = C G A^T for G = sum_t delta_t h_t^T, per sequence."""
    gen = torch.Generator().manual_seed(0)
    delta, hidden = torch.randn(3, 5, 11, generator=gen), torch.randn(3, 5, 7, generator=gen)
    c, a = torch.randn(4, 11, generator=gen), torch.randn(2, 7, generator=gen)
    projected, exact = lmv.output_layer_statistics(delta, hidden, c, a)
    g = torch.einsum("btv,btd->bvd", delta, hidden).double()
    float32 = dict(rtol=1e-5, atol=1e-5)  # delta and the projections are multiplied in float32
    torch.testing.assert_close(exact, (g**2).sum((1, 2)), **float32)
    torch.testing.assert_close(projected, (c.double() @ g @ a.double().T).flatten(1), **float32)


def test_statistics_match_numpy_with_an_identity_projection():
    """With K = the full dimension and no projection, trace, |E g|^2 and the paired bias are the
    textbook estimates (every sample is known exactly)."""
    rng = np.random.default_rng(0)
    labels = list(lmv.label(e, o) for e, o in lmv.ON_POLICY)
    n, k = 400, 6
    common = rng.normal(size=k)
    projected = common + rng.normal(size=(n, len(labels), k))
    shift = labels.index("k3-loss")
    projected[:, shift] += 2.0  # a bias of |(2, ..., 2)|^2 = 4 k
    stats = statistics(projected, (projected**2).sum(-1), labels, "on")
    m = stats["k3-loss"]
    sample = projected[:, shift]
    assert m["trace"] == pytest.approx(sample.var(0, ddof=1).sum(), rel=1e-9)
    # the paired estimate is unbiased for |b|^2 = 24 with standard error ~ sqrt(4 |b|^2 1.2 / n) = 0.54
    assert m["bias_sq"] == pytest.approx(4 * k, abs=6 * 0.54)
    assert stats["reinforce"]["cosine"] > 0.9


def test_per_sequence_logit_gradients_add_up_to_the_batch_loss_gradient(tiny_lm_path):
    """Row b of delta is sequence b's own estimate: their mean is d sequence_kl_loss / d logits."""
    policy = load_causal_lm(tiny_lm_path)[0]
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 4, policy.config.vocab_size
    sampled = lmv.Sampled(
        logits=torch.randn(b, t, v, generator=gen), hidden=torch.randn(b, t, 8, generator=gen),
        ref_logits=torch.randn(b, t, v, generator=gen), behaviour_logprobs=None,
        tokens=torch.randint(0, v, (b, t), generator=gen), mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).bool(),
    )  # fmt: skip
    for name, options in lmv.ON_POLICY:
        delta = lmv.logit_gradient(sampled, name, options)
        logits = sampled.logits.clone().requires_grad_()
        logp = logits.log_softmax(-1).gather(-1, sampled.tokens[..., None]).squeeze(-1)
        ref_logp = sampled.ref_logits.log_softmax(-1).gather(-1, sampled.tokens[..., None]).squeeze(-1)
        loss = kl_estimators.sequence_kl_loss(name, logp, ref_logp, sampled.mask, logits, sampled.ref_logits, **options)
        torch.testing.assert_close(delta / b, torch.autograd.grad(loss, logits)[0] * sampled.mask[..., None], msg=name)
        assert delta[~sampled.mask].abs().max() == 0


def test_command_measures_tiny_policies_and_resumes(tiny_lm_path, tmp_path, monkeypatch, capsys):
    """The whole command on the tiny model: reference and one policy, on and off; a rerun adds nothing."""
    policy = load_causal_lm(tiny_lm_path)[0]
    root = tmp_path / "runs"
    for folder in ("policy", lmv.BEHAVIOUR):
        policy.save_pretrained(root / "k1-b0.3" / folder)
        load_causal_lm(tiny_lm_path)[1].save_pretrained(root / "k1-b0.3" / folder)
    monkeypatch.setattr(lmv, "REFERENCE", tiny_lm_path)
    monkeypatch.setattr(lmv, "NEW_TOKENS", 3)
    out = tmp_path / "results"
    argv = ["--root", str(root), "--out", str(out), "--betas", "0.3", "--sequences", "6", "--reference-sequences", "2", "--chunk", "3"]
    assert lmv.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["policy"], s["regime"], s["n_sequences"]) for s in summary] == [
        ("reference", "on", 3), ("k1-b0.3", "on", 6), ("k1-b0.3", "off", 6)
    ]
    # pi = mu = pi_ref here: every estimator but k1-loss is exactly 0 on every sequence
    for s in summary:
        assert {k for k, v in s["max_exact_norm_sq"].items() if v > 1e-8} == {"k1-loss"}
    assert (out / "table.md").is_file()
    capsys.readouterr()
    assert lmv.main(argv) == 0
    assert "sequences" not in capsys.readouterr().out


def test_command_refuses_missing_policies(tmp_path, capsys):
    assert lmv.main(["--root", str(tmp_path), "--out", str(tmp_path / "out"), "--betas", "0.3"]) == 2
    assert "no policy" in capsys.readouterr().err


def test_policy_commands_are_the_cli_with_k1_in_the_reward(tmp_path, capsys):
    from studies import lm_variance_policies as policies

    cmd = policies.command(tmp_path / "c.yaml", 0.1, tmp_path / "out", 19, resume=False)
    assert cmd[1:3] == ["-m", "agents.ppo_kl"]
    flags = " ".join(cmd[3:])
    assert "--kl-reward k1 --no-analytic-grad --kl-coef 0.1 --seed 0" in flags and flags.endswith("--iters 19")
    assert policies.command(tmp_path / "c.yaml", 0.1, tmp_path / "out", 20, resume=True)[-1] == "--resume"
    assert policies.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
