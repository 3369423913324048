"""KL-coefficient controllers: the Ziegler et al. (2019) proportional update."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kl_estimators import AdaptiveKLController, FixedKLController

positive = st.floats(1e-3, 1e3)


@settings(deadline=None, max_examples=50)
@given(coef=st.floats(0, 10), kl=st.floats(0, 100), n_steps=st.integers(0, 10_000))
def test_fixed_controller_never_changes(coef, kl, n_steps):
    controller = FixedKLController(coef)
    assert controller.update(kl, n_steps) == coef
    assert controller.value == coef


@settings(deadline=None, max_examples=100)
@given(beta=positive, target=positive, horizon=positive, kl=st.floats(0, 1e4), n_steps=st.integers(0, 100))
def test_adaptive_controller_follows_proportional_rule(beta, target, horizon, kl, n_steps):
    assume(n_steps < 5 * horizon)  # beyond, the factor could be <= 0: refused (test_hostile_estimators)
    controller = AdaptiveKLController(beta, target, horizon)
    error = min(max(kl / target - 1, -0.2), 0.2)
    expected = beta * max(0.0, 1 + error * n_steps / horizon)  # floored: beta never turns negative
    assert controller.update(kl, n_steps) == pytest.approx(expected, rel=1e-12)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_controller_moves_beta_towards_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert controller.update(current_kl=12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    above = controller.value
    assert controller.update(current_kl=6.0, n_steps=256) == pytest.approx(above)
    assert controller.update(current_kl=5.4, n_steps=256) == pytest.approx(above * (1 - 0.1 * 256 / 10_000))
    assert controller.update(current_kl=0.0, n_steps=10_000) == pytest.approx(controller.value)
    assert controller.value < above


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FixedKLController(-0.1), "kl_coef"),
        (lambda: AdaptiveKLController(-0.1, 6.0, 10_000), "init_kl_coef"),
        (lambda: AdaptiveKLController(0.1, 0.0, 10_000), "target"),
        (lambda: AdaptiveKLController(0.1, -1.0, 10_000), "target"),
        (lambda: AdaptiveKLController(0.1, 6.0, 0), "horizon"),
        (lambda: AdaptiveKLController(0.1, 6.0, -5), "horizon"),
        (lambda: AdaptiveKLController(0.1, 6.0, 10).update(float("nan"), 1), "current_kl"),
        (lambda: AdaptiveKLController(0.1, 6.0, 10).update(1.0, -1), "n_steps"),
    ],
)
def test_bad_arguments_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_controllers_refuse_non_finite_or_negative_settings(bad):
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(bad)
    with pytest.raises(ValueError, match="init_kl_coef"):
        AdaptiveKLController(bad, 1.0, 10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 1.0, bad if bad != -1.0 else 0.0)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, bad, 10)


def test_adaptive_step_that_would_turn_beta_negative_is_refused():
    """KL far below target over 5 horizons or more: e = -0.2 would give 1 - 0.2 n / H <= 0, so the
    step is refused and beta is left as it was; just below 5 horizons beta shrinks but stays > 0."""
    controller = AdaptiveKLController(0.5, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="5 x horizon"):
        controller.update(0.0, 50)
    assert controller.value == 0.5
    assert 0.0 < controller.update(0.0, 49) < 0.5


