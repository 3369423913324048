"""The tabular study: its command on a tiny grid, and the exact (deterministic) dynamics it reports.

Every assertion on dynamics uses exact expectations over all sequences (float64), so nothing
depends on sampling; the margins between "reaches pi*" (KL < 1e-9) and "does not" (KL > 1e-3)
are six orders of magnitude.
"""

from __future__ import annotations

import json

import pytest
import torch

import kl_estimators
from studies import tabular
from studies.tabular_configs import all_configs
from studies.tabular_dynamics import expected_gradient, run_exact
from studies.tabular_model import make_instance, sequence_logprobs

CONFIGS = {c.name: c for c in all_configs()}
INSTANCE = make_instance(vocab=3, length=3, beta=1.0, seed=0)


def test_optimum_table_is_pi_star():
    for vocab, length in [(2, 1), (3, 3), (5, 2)]:
        instance = make_instance(vocab, length, beta=0.7, seed=1)
        torch.testing.assert_close(
            sequence_logprobs(instance.space, instance.optimum_table()), instance.optimum_logprobs(), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("name", ["loss:analytic-future", "loss:reinforce-future", "reward:analytic+grad", "reward:k1+grad"])
def test_unbiased_exact_dynamics_reach_the_optimum(name):
    result = run_exact(CONFIGS[name], INSTANCE, eta=1.0, max_steps=1500, tol=1e-7)
    assert result["converged"]
    assert result["kl_to_opt"] < 1e-9


@pytest.mark.parametrize("name", ["loss:analytic", "loss:k3-loss", "loss:k1-loss", "loss:k2-loss", "reward:analytic"])
def test_biased_exact_dynamics_end_away_from_the_optimum(name):
    result = run_exact(CONFIGS[name], INSTANCE, eta=1.0, max_steps=600, tol=1e-7)
    assert not result["kl_to_opt"] < 1e-3  # also true when the run diverged (NaN)


def test_off_policy_steps_keep_the_fixed_point():
    """Four importance-weighted steps per batch (mu = the policy at the batch start) still reach pi*."""
    instance = make_instance(vocab=2, length=3, beta=1.0, seed=0)
    result = run_exact(CONFIGS["off:analytic-future-is"], instance, eta=0.25, max_steps=3000, tol=1e-8)
    assert result["kl_to_opt"] < 1e-9


@pytest.mark.parametrize("name", kl_estimators.ESTIMATOR_INFO)
@pytest.mark.parametrize("family", ["loss", "offline"])
def test_pi_star_is_a_fixed_point_exactly_when_the_estimator_is_unbiased(family, name):
    """E_mu[grad L] at pi* is 0 (rounding) for the estimators ESTIMATOR_INFO calls unbiased, and > 1e-3 for
    the others: on-policy (mu = pi*) and offline (mu = pi_ref, a fixed behaviour policy)."""
    grad = expected_gradient(CONFIGS[f"{family}:{name}"], INSTANCE, INSTANCE.optimum_table()).abs().max()
    info = kl_estimators.ESTIMATOR_INFO[name]
    if info.unbiased_on_policy if family == "loss" else info.unbiased_off_policy:
        assert grad < 1e-12
    else:
        assert grad > 1e-3


@pytest.mark.parametrize(
    ("ppokl", "library"),
    [("reward:k1", "loss:reinforce-future"), ("reward:analytic+grad", "loss:analytic-future"), ("reward:k3", "loss:k3-reward")],
)
def test_kl_in_the_reward_equals_the_library_estimator(ppokl, library):
    """PPOKL-style KL rewards with returns-to-go have the library estimator's expected gradient."""
    table = INSTANCE.ref_table + torch.randn(INSTANCE.ref_table.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(
        expected_gradient(CONFIGS[ppokl], INSTANCE, table), expected_gradient(CONFIGS[library], INSTANCE, table), rtol=1e-9, atol=1e-12
    )


def test_study_command_writes_results_and_report_and_resumes(tmp_path, capsys):
    argv = [
        "--out", str(tmp_path), "--vocab", "2", "--length", "1,2", "--beta", "1", "--max-steps", "20",
        "--sampled", "2x2@1", "--seeds", "2", "--sgd-steps", "10", "--batch-size", "8",
        "--configs", "loss:analytic-future,reward:analytic,ppo:analytic+grad,off:k3-ratio",
    ]  # fmt: skip
    tabular.main(argv)
    exact = sorted((tmp_path / "exact").rglob("*.json"))
    sampled = sorted((tmp_path / "sampled").rglob("*.json"))
    assert len(exact) == 2 * 4 and len(sampled) == 4 * 2
    cell = json.loads(exact[0].read_text())
    assert {"kl_to_opt", "reward", "kl_to_ref", "grad_at_opt", "trajectory", "machine", "seconds"} <= set(cell)
    table = (tmp_path / "table.md").read_text()
    assert "`reward:analytic`" in table and "Sampled dynamics on `V2-T2-b1-s0`" in table
    for name in ("exact.csv", "sampled.csv", "exact_fixed_points.png", "sampled_V2-T2-b1-s0.png"):
        assert (tmp_path / name).stat().st_size > 0
    capsys.readouterr()
    tabular.main(argv)
    assert "0 cells run" in capsys.readouterr().out
    (tmp_path / "table.md").unlink()
    tabular.main(["--out", str(tmp_path), "--report"])
    assert (tmp_path / "table.md").read_text() == table


def test_bad_arguments_fail_with_one_line(capsys):
    with pytest.raises(SystemExit):
        tabular.parse_args(["--eta", "0"])
    assert "--eta must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown"):
        tabular.main(["--out", "/nonexistent-never-written", "--configs", "loss:nope"])
