"""The tables of docs/nlpo.md: NLPO vs PPO from the LM study's committed results, and what each KL
estimator's expectation is under action masks (from ``kl_estimators.ESTIMATOR_INFO``, proven in
``tests/test_masked_kl.py``).

    python -m tools.docs_blocks        # regenerates docs/nlpo.md's blocks from these functions
"""
from __future__ import annotations

from pathlib import Path

from kl_estimators import ESTIMATOR_INFO
from studies.lm_grid import VARIANTS
from studies.lm_report import aggregate, load_records, paired_table, table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "lm"
BASELINE = "analytic-agrad"  # PPO with the analytic KL reward + gradient: NLPO's KL handling unmasked
NLPO_VARIANTS = ("nlpo-p0.9", "nlpo-p0.5")
BETA = 0.1
SEEDS = (0, 1, 2)
# Estimators whose value is a (possibly importance-weighted) k3_t: under a mask their expectation
# is KL(pi^M || pi_ref) - D, D = E[sum_t pi_ref(not M | s_t)] (tests/test_masked_kl.py).
K3_VALUE_ESTIMATORS = tuple(name for name, info in ESTIMATOR_INFO.items() if "k3_t" in info.term)


def comparison_records(results: Path = RESULTS) -> list[dict]:
    """The finished runs of PPO (``BASELINE``) and NLPO at ``BETA`` for ``SEEDS``."""
    records, _ = load_records(results)
    wanted = (BASELINE, *NLPO_VARIANTS)
    return [r for r in records if r["variant"] in wanted and float(r["beta"]) == BETA and int(r["seed"]) in SEEDS]


def comparison_table(results: Path = RESULTS) -> str:
    """Held-out metrics (mean ± standard error across seeds), then NLPO - PPO paired by seed."""
    records = comparison_records(results)
    _, reference = load_records(results)
    order = [BASELINE, *NLPO_VARIANTS]
    labels = {name: VARIANTS[name].label for name in order}
    labels[BASELINE] = "PPO: " + labels[BASELINE]
    cells = aggregate(records, order)
    paired = paired_table(records, labels, order, BASELINE)
    return table(cells, labels, reference) + "\nPaired by seed, NLPO - PPO:\n\n" + paired


def masked_kl_table() -> str:
    """Per estimator: E[gradient] and E[value] for the masked policy pi^M with the masks re-applied
    in the update (PPOKL), and E[gradient] when the mask is applied at sampling only."""
    head = [
        "estimator",
        "masks re-applied: E[gradient]",
        "masks re-applied: E[value]",
        "mask at sampling only: E[gradient]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info in ESTIMATOR_INFO.items():
        on = info.on_policy_gradient
        gradient = "grad KL(pi^M ‖ pi_ref) (unbiased)" if info.unbiased_on_policy else (f"`{on}` at pi^M" if on else "biased (no closed form)")
        if name == "k3-reward":
            gradient += " - grad_states D"
        if not info.value_unbiased_on_policy:
            value = "biased"
        elif name in K3_VALUE_ESTIMATORS:
            value = "KL(pi^M ‖ pi_ref) - D (biased low)"
        else:
            value = "KL(pi^M ‖ pi_ref)"
        if info.uses_behaviour:
            framework = "not claimed (importance weights pi/pi^M cannot reach tokens outside the mask)"
        else:
            off = info.off_policy_gradient
            framework = f"`{off}` with mu = pi^M" if off else "biased (no closed form)"
        lines.append(f"| `{name}` | {gradient} | {value} | {framework} |")
    return "\n".join(lines) + "\n"
