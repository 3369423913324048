"""The kl_estimators package: public API and its torch-only dependency footprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kl_estimators

FORBIDDEN = ("transformers", "gymnasium", "stable_baselines3", "datasets", "lmgym", "agents")


def test_public_api():
    assert set(kl_estimators.__all__) == {
        "ESTIMATORS", "ESTIMATOR_INFO", "GRADIENT_QUANTITIES", "AdaptiveKLController", "EstimatorInfo",
        "FixedKLController", "analytic", "k1", "k2", "k3", "per_token_kl_loss", "sequence_kl_loss",
    }
    assert all(hasattr(kl_estimators, name) for name in kl_estimators.__all__)
    assert kl_estimators.ESTIMATORS == (
        "reinforce", "reinforce-future", "reinforce-future-is", "analytic", "analytic-is", "analytic-future",
        "analytic-future-is", "k1-loss", "k2-loss", "k3-loss", "abs-loss", "k1+", "k3+", "k3-ratio", "k3+is",
        "k3-reward",
    )
    assert tuple(kl_estimators.ESTIMATOR_INFO) == kl_estimators.ESTIMATORS


def test_imports_only_torch():
    code = (
        "import sys, kl_estimators; "
        f"loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
