"""KL-coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

import math

from kl_estimators._checks import check_number


class FixedKLController:
    """A constant KL coefficient beta.

    Args:
        kl_coef: beta, >= 0.

    Raises:
        ValueError: ``kl_coef`` is negative or NaN.
    """

    def __init__(self, kl_coef: float) -> None:
        self._value = check_number("kl_coef", kl_coef, low=0.0)

    @property
    def value(self) -> float:
        """The current KL coefficient beta."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> float:
        """Leave beta unchanged and return it.

        Args:
            current_kl: the observed KL (ignored).
            n_steps: the number of steps it was observed over (ignored).

        Returns:
            beta.
        """
        return self._value


class AdaptiveKLController:
    """Proportional control of beta towards a target KL.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).

    The factor is positive only while n_steps / horizon < 1 / 0.2 = 5: a larger step is refused
    (``ValueError``), since beta would turn negative and the KL be rewarded.

    Args:
        init_kl_coef: the initial beta, finite and >= 0.
        target: the KL to steer towards, finite and > 0 (in the units of the ``current_kl`` passed to ``update``).
        horizon: finite and > 0; each update multiplies beta by 1 + e * n_steps / horizon, with e the clipped error.

    Raises:
        ValueError: an argument is out of its range.
    """

    MAX_STEP_FRACTION = 5.0  # n_steps / horizon below which 1 + e n_steps / horizon > 0 for |e| <= 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self._value = check_number("init_kl_coef", init_kl_coef, low=0.0)
        self.target = check_number("target", target, low=0.0, open_low=True)
        self.horizon = check_number("horizon", horizon, low=0.0, open_low=True)

    @property
    def value(self) -> float:
        """The current KL coefficient beta."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional step for ``current_kl`` observed over ``n_steps``; return beta.

        Args:
            current_kl: the KL observed in this batch.
            n_steps: the number of steps (e.g. tokens or sequences) it was observed over, >= 0.

        Returns:
            The new beta.

        Raises:
            ValueError: ``current_kl`` is NaN, or ``n_steps`` is negative or >= 5 x horizon.
        """
        if math.isnan(current_kl):
            raise ValueError("current_kl must not be NaN")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps!r}")
        if n_steps >= self.MAX_STEP_FRACTION * self.horizon:
            raise ValueError(
                f"n_steps {n_steps} must be < 5 x horizon ({self.horizon:g}): the factor 1 + e n_steps / horizon "
                "would reach 0 or below and beta turn negative; use a larger horizon"
            )
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self._value *= 1.0 + error * n_steps / self.horizon
        return self._value
