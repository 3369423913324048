"""The moments study's grid: the base problem, the seeds, the staleness and clip sweeps and the
off-policy variants; read by the runner ``studies.moments`` and by ``studies.moments_report``."""
from __future__ import annotations

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
