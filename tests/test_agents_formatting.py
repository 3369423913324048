"""agents.cli.formatting: an exact KL never shows below 0 by round-off; numbers are rounded."""

from __future__ import annotations

from agents.cli.formatting import fmt, rounded, shown


def test_an_exact_kl_is_clamped_at_zero_and_a_sampled_one_is_not():
    assert shown("rollout/kl_analytic", -1e-9) == 0.0
    assert shown("rollout/kl_in_reward", -0.2) == -0.2
    assert fmt("rollout/kl_analytic", -1e-9, ".3f") == "0.000"
    assert fmt("rollout/kl_analytic", "1.23456", ".3f") == "1.235"


def test_no_negative_zero_is_printed():
    assert fmt("train/policy_gradient_loss", -1e-7, ".3f") == "0.000"
    assert fmt("train/policy_gradient_loss", -1e-7, "+.3f") == "+0.000"
    assert fmt("train/policy_gradient_loss", -0.5, "+.3f") == "-0.500"
    assert fmt("x", None, ".3f") == "-" and fmt("x", "", ".3f") == "-"


def test_rounded_keeps_four_significant_digits_and_integers_whole():
    assert rounded("rollout/task_reward", "0.12345678901234567") == "0.1235"
    assert rounded("rollout/kl_analytic", "-3.0000000000000004e-09") == "0"
    assert rounded("time/x", "1.23456e-05") == "1.235e-05"
    assert rounded("iteration", "12") == "12" and rounded("iteration", 12.0) == "12"
    assert rounded("model", "smollm2-135m") == "smollm2-135m"
