"""The drop-in example of docs/kl-estimators.md: a GRPO-style update in plain PyTorch with a kl_estimators KL term."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "grpo_kl.py"


def load_example():
    spec = importlib.util.spec_from_file_location("grpo_kl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_its_kl_term_holds_the_policy_near_the_reference():
    """Seed 0, 40 steps of 2 epochs: beta = 1 keeps the KL far below beta = 0 (measured 0.60 vs
    15.4 nats; seeds 0-2 give ratios 0.04, 0.02, 0.07, so the margin 0.25 holds on any rounding)."""
    example = load_example()
    free, regularised = example.train(beta=0.0), example.train(beta=1.0)
    assert regularised < 0.25 * free
