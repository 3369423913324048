"""KL-coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

import math


class FixedKLController:
    """A constant KL coefficient beta.

    Args:
        kl_coef: beta, >= 0.

    Raises:
        ValueError: ``kl_coef`` is negative or NaN.
    """

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self._value = float(kl_coef)

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

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * max(0, 1 + e * n_steps / horizon).

    The factor is floored at 0 so that beta never turns negative (it could once n_steps > 5 horizon).

    Args:
        init_kl_coef: the initial beta, finite and >= 0.
        target: the KL to steer towards, finite and > 0 (in the units of the ``current_kl`` passed to ``update``).
        horizon: finite and > 0; each update multiplies beta by max(0, 1 + e * n_steps / horizon), with e the clipped error.

    Raises:
        ValueError: an argument is out of its range.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (math.isfinite(init_kl_coef) and init_kl_coef >= 0):
            raise ValueError(f"init_kl_coef must be a finite number >= 0, got {init_kl_coef!r}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a finite number > 0, got {target!r}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self._value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

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
            ValueError: ``current_kl`` is NaN or ``n_steps`` is negative.
        """
        if math.isnan(current_kl):
            raise ValueError("current_kl must not be NaN")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self._value *= max(0.0, 1.0 + error * n_steps / self.horizon)
        return self._value
