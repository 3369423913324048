"""KL values, KL-gradient estimators (on- and off-policy) and KL-coefficient controllers for RL
fine-tuning of LMs; the exact KL also fused with the output layers (``fused_kl``, ``LinearLogits``),
from hidden states without [B, T, V] logits.

Standalone: imports nothing but torch and the standard library.
"""

__version__ = "0.1.0"  # the distribution lmgym-kl's version: pyproject.toml reads it from here

import warnings

with warnings.catch_warnings():
    # Without numpy (``pip install .`` does not bring it), ``import torch`` warns "Failed to
    # initialize NumPy" from its C++ side; this library never converts to numpy, so the warning is noise.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401  (imported first, here, so that the filter covers torch's import)

from kl_estimators.controllers import AdaptiveKLController, FixedKLController
from kl_estimators.fused import FusedKL, LinearLogits, fused_kl
from kl_estimators.gradients import ESTIMATORS, per_token_kl_loss, sequence_kl_loss
from kl_estimators.info import ESTIMATOR_INFO, GRADIENT_QUANTITIES, EstimatorInfo
from kl_estimators.values import analytic, k1, k2, k3

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_INFO",
    "GRADIENT_QUANTITIES",
    "AdaptiveKLController",
    "EstimatorInfo",
    "FixedKLController",
    "FusedKL",
    "LinearLogits",
    "analytic",
    "fused_kl",
    "k1",
    "k2",
    "k3",
    "per_token_kl_loss",
    "sequence_kl_loss",
]
