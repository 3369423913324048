"""``studies.lm_variance_exact``: the running-sum statistics are the dense ones, and unbiased.

A tabular policy is an LM whose final hidden state is the one-hot of the prefix's table row: its
output-layer gradient sum_t delta_t h_t^T is the per-sequence gradient of the logit table. So the
exact moments of ``studies.moments_exact`` are the truth, and averaging the n = 2 statistics over
every ordered pair of sequences, weighted q(y_1) q(y_2), is their expectation under i.i.d.
sampling, exactly.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

import kl_estimators
from studies.lm_variance_exact import ExactSums, classes
from studies.moments import Cell, problem
from studies.moments_exact import exact_moments

LABELS = ["reinforce-future", "analytic-future", "analytic", "k2-loss", "k3-loss"]


def tabular_inputs(prob, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [N, T, V], one-hot hidden [N, T, rows]) for every sequence of ``prob``."""
    tokens = prob.space.sequences
    rows = prob.space.rows(tokens)
    logits = prob.table.detach()[rows].requires_grad_()
    logp = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_logp = prob.ref_table.log_softmax(-1)[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    name = label.split("[")[0]
    terms = kl_estimators.per_token_kl_loss(name, logp, ref_logp, torch.ones_like(tokens, dtype=torch.bool), logits, prob.ref_table[rows])
    (delta,) = torch.autograd.grad(terms.sum(), logits)
    hidden = torch.nn.functional.one_hot(rows, prob.space.n_rows).double()
    return delta, hidden


@pytest.fixture(scope="module")
def tabular():
    prob = problem(Cell("x", 2, 3, 0.5, 0))
    inputs = {label: tabular_inputs(prob, label) for label in LABELS}
    return prob, inputs


def test_running_sums_are_the_dense_statistics(tabular):
    _, inputs = tabular
    hidden = inputs[LABELS[0]][1]
    sums = ExactSums(LABELS, "on")
    for chunk in (slice(0, 3), slice(3, 8)):  # chunks add up
        sums.add({k: d[chunk] for k, (d, _) in inputs.items()}, hidden[chunk])
    stats = sums.statistics(n_boot=20)["estimators"]
    for label in LABELS:
        g = torch.einsum("btv,btd->bvd", inputs[label][0], hidden).flatten(1)
        assert stats[label]["second_moment"] == pytest.approx(float((g**2).sum(-1).mean()), rel=1e-12)
    g = torch.einsum("btv,btd->bvd", inputs["analytic-future"][0], hidden).flatten(1)
    n = len(g)
    u_stat = (float((g.sum(0) ** 2).sum()) - float((g**2).sum())) / (n * (n - 1))
    assert stats["reinforce-future"]["mean_sq"] == pytest.approx(u_stat, rel=1e-12)  # pooled: one class
    assert stats["k2-loss"]["class"] == stats["analytic"]["class"] == "direct"


def test_n2_statistics_are_unbiased_over_every_pair(tabular):
    """E over i.i.d. pairs of the n = 2 statistics = the exact trace, |E g|^2 and |bias|^2."""
    prob, inputs = tabular
    q = prob.sampler_probs()
    hidden = inputs[LABELS[0]][1]
    totals: dict[str, dict[str, float]] = {label: {"trace": 0.0, "bias_sq": 0.0, "mean_sq": 0.0} for label in LABELS}
    for i, j in itertools.product(range(len(q)), repeat=2):
        sums = ExactSums(LABELS, "on")
        sums.add({k: d[[i, j]] for k, (d, _) in inputs.items()}, hidden[[i, j]])
        stats = sums.statistics(n_boot=1)["estimators"]
        for label in LABELS:
            for key in totals[label]:
                totals[label][key] += float(q[i] * q[j]) * stats[label][key]
    grad_kl = prob.grad_kl()
    for label in LABELS:
        exact = exact_moments(prob, label)
        assert totals[label]["trace"] == pytest.approx(exact.trace, rel=1e-9), label
        assert totals[label]["mean_sq"] == pytest.approx(float((exact.mean**2).sum()), rel=1e-9), label
        expected_bias = float(((exact.mean - grad_kl) ** 2).sum())
        assert totals[label]["bias_sq"] == pytest.approx(expected_bias, rel=1e-9, abs=1e-14), label


def test_classes_pool_equal_expectations_only():
    on = classes(["reinforce", "analytic-future", "analytic", "k3+is", "k1-loss"], "on")
    assert on["reinforce"] == on["analytic-future"] == "grad_kl" and on["analytic"] == on["k3+is"] == "direct"
    off = classes(["reinforce-future-is", "reinforce-future", "analytic-future[importance=sequence]", "reinforce-future[importance=token]"], "off")
    assert off["reinforce-future-is"] == off["analytic-future[importance=sequence]"] == "grad_kl"
    assert off["reinforce-future"] == "reinforce-future" and off["reinforce-future[importance=token]"] == "reinforce-future[importance=token]"
    with pytest.raises(ValueError, match="no unbiased estimator"):
        ExactSums(["analytic", "k2-loss"], "on")


def test_trace_ratio_interval_contains_its_estimate(tabular):
    _, inputs = tabular
    sums = ExactSums(LABELS, "on")
    sums.add({k: d for k, (d, _) in inputs.items()}, inputs[LABELS[0]][1])
    stats = sums.statistics(n_boot=200)["estimators"]["reinforce-future"]
    lo, hi = stats["trace_ratio_ci"]
    assert lo <= stats["trace_ratio_to_reference"] <= hi


def test_command_measures_tiny_policies_exactly_and_resumes(tiny_lm_path, tmp_path, monkeypatch, capsys):
    """The command on the tiny model (pi = mu = pi_ref): every estimator but k1-loss is exactly 0,
    and a rerun measures nothing."""
    import json

    import studies.lm_variance as lmv
    from lmgym.assets import load_causal_lm
    from studies.lm_variance_exact_run import main

    root = tmp_path / "runs"
    for folder in ("policy", "behaviour"):
        model, tokenizer = load_causal_lm(tiny_lm_path)
        model.save_pretrained(root / "k1-b0.3" / folder)
        tokenizer.save_pretrained(root / "k1-b0.3" / folder)
    monkeypatch.setattr(lmv, "REFERENCE", tiny_lm_path)
    monkeypatch.setattr(lmv, "NEW_TOKENS", 3)
    argv = ["--root", str(root), "--out", str(tmp_path / "out"), "--betas", "0.3", "--sequences", "4", "--chunk", "2"]
    assert main(argv) == 0
    for regime in ("on", "off"):
        record = json.loads((tmp_path / "out" / f"k1-b0.3-{regime}.json").read_text())
        assert record["n_sequences"] == 4 and record["threads"] == 1
        nonzero = {k for k, v in record["estimators"].items() if v["second_moment"] > 1e-10}
        assert nonzero == {"k1-loss"}
    capsys.readouterr()
    assert main(argv) == 0
    assert "sequences in" not in capsys.readouterr().out
    (root / "k1-b0.3").rename(root / "k1-b0.3-seed1")  # another training seed's folder, on-policy only
    assert main([*argv, "--seed", "1", "--behaviours", ""]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*seed1*")) == ["k1-b0.3-seed1-on.json"]
    assert main(["--root", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--threads", "0"])
    assert refused.value.code == 2


def test_pair_inner_is_the_lm_variance_studys_exact_norm():
    import studies.lm_variance as lmv
    from studies.lm_variance_exact import pair_inner

    gen = torch.Generator().manual_seed(0)
    delta, hidden = torch.randn(3, 4, 11, generator=gen), torch.randn(3, 4, 5, generator=gen)
    c, a = torch.randn(2, 11, generator=gen), torch.randn(2, 5, generator=gen)
    torch.testing.assert_close(pair_inner(delta, delta, hidden), lmv.output_layer_statistics(delta, hidden, c, a)[1])
    dense = torch.einsum("btv,btd->bvd", delta.double(), hidden.double())
    other = torch.randn(3, 4, 11, generator=gen)
    dense_other = torch.einsum("btv,btd->bvd", other.double(), hidden.double())
    torch.testing.assert_close(pair_inner(delta, other, hidden), (dense * dense_other).sum((1, 2)))


def test_policies_export_several_staleness_levels_and_seeds(tmp_path, monkeypatch, capsys):
    """--stale 1,5 --seed 1: trains to ITERS - 5, exports, to ITERS - 1, exports, then finishes,
    with --seed 1 into k1-b<beta>-seed1; a finished run refuses a new staleness level."""
    from studies import lm_variance_policies as policies

    calls = []

    def fake_run(cmd, out):
        calls.append(cmd)
        (out / policies.POLICY).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(policies, "_run", fake_run)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = ["--config", str(config), "--root", str(tmp_path / "runs"), "--betas", "0.1", "--seed", "1", "--stale", "1,5"]
    assert policies.main(argv) == 0
    out = tmp_path / "runs" / "k1-b0.1-seed1"
    assert [(c[c.index("--iters") + 1], c[c.index("--seed") + 1]) for c in calls] == [
        (str(policies.ITERS - 5), "1"), (str(policies.ITERS - 1), "1"), (str(policies.ITERS), "1")
    ]
    assert (out / "behaviour").is_dir() and (out / "behaviour-5").is_dir() and (out / "done").is_file()
    assert policies.main([*argv[:-1], "1,3"]) == 2
    assert "cannot export" in capsys.readouterr().err
    assert policies.main([*argv[:-1], "0"]) == 2


def test_policy_training_starts_in_an_empty_run_folder(tmp_path):
    """The CLI refuses a non-empty --out that holds no run, so the training step's logs are kept
    beside the run folder: the command starts with ``out`` absent, and the logs record it."""
    from studies import lm_variance_policies as policies

    out = tmp_path / "runs" / "k1-b0.1"
    check = "import pathlib, sys; assert not pathlib.Path(sys.argv[1]).exists(); print('ran')"
    policies._run([sys.executable, "-c", check, str(out)], out)
    commands, train_log = policies.log_paths(out)
    assert "ran" in train_log.read_text() and commands.read_text().startswith("python -c")
