"""The moments study's grid: the base problem, the seeds, the staleness and clip sweeps and the
off-policy variants, and how a run is labelled and whether it is unbiased; read by the runners
(``studies.moments``, ``studies.moments_instances``) and by the reports."""
from __future__ import annotations

import kl_estimators

SEEDS = (0, 1, 2)
BASE = dict(vocab=3, length=3, beta=0.3)
STALENESS = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
CLIP_STALENESS = 1.0
CLIPS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Off-policy variants made unbiased (or PPO-like) by options, beside the estimators' defaults.
OFF_POLICY_VARIANTS: tuple[tuple[str, dict], ...] = (
    ("reinforce", {"importance": "sequence"}),
    ("reinforce-future", {"importance": "sequence"}),
    ("reinforce-future", {"importance": "token"}),
    ("analytic-future", {"importance": "sequence"}),
    ("k3-loss", {"importance": "token"}),
)
CLIPPED = ("reinforce-future-is", "analytic-future-is", "k3+is", "k3-ratio")


def label(estimator: str, options: dict) -> str:
    """``estimator`` with its options, e.g. ``reinforce-future[importance=sequence]``."""
    if not options:
        return estimator
    return estimator + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


def unbiased(estimator: str, options: dict, off_policy: bool) -> bool:
    """Whether ``ESTIMATOR_INFO`` (and the exact importance-sampling identity) make it unbiased."""
    info = kl_estimators.ESTIMATOR_INFO[estimator]
    if options.get("weight_clip") is not None:
        return False
    if options.get("importance") == "sequence":
        return info.unbiased_on_policy
    if options.get("importance") == "token":
        return info.unbiased_on_policy and not off_policy
    return info.unbiased_off_policy if off_policy else info.unbiased_on_policy
