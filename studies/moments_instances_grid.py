"""The per-problem moments study's grid (``studies.moments_instances``): instances per sweep point,
the fixed-KL levels and the (staleness, weight_clip) sweep; read by the runner and its report."""

from __future__ import annotations

from studies.moments_grid import OFF_POLICY_VARIANTS

N_SEEDS = 48
BETA = 0.3
KL_LEVELS = (0.25, 1.0, 2.0)
CLIP_STALENESS = (0.2, 0.4, 0.7, 1.0)
CLIPS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Every estimator that weights by pi/mu: the -is estimators, the differentiable-ratio k3, and the
# sequence-weighted forms of the estimators that ignore mu.
CLIP_RUNS: tuple[tuple[str, dict], ...] = (
    ("reinforce-future-is", {}),
    ("analytic-future-is", {}),
    ("analytic-is", {}),
    ("k3+is", {}),
    ("k3-ratio", {}),
    *((name, options) for name, options in OFF_POLICY_VARIANTS if options["importance"] == "sequence"),
)
