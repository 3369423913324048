"""KL values, KL-gradient estimators and KL-coefficient controllers for RL fine-tuning of LMs.

Standalone: imports nothing but torch and the standard library.
"""

from kl_estimators.controllers import AdaptiveKLController, FixedKLController
from kl_estimators.gradients import ESTIMATORS, sequence_kl_loss
from kl_estimators.values import analytic, k1, k2, k3

__all__ = [
    "ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "analytic",
    "k1",
    "k2",
    "k3",
    "sequence_kl_loss",
]
