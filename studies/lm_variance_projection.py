"""How far the LM study's projected statistics are from the exact ones, from its committed summary.

``studies.lm_variance`` records, per sequence and estimator, the exact squared norm |g|^2 of the
output-layer gradient and a fixed 16 x 16 random projection P g; every statistic of its tables is
computed in the projection. The exact second moment E|g|^2 = trace Cov[g] + |E g|^2 is known,
and with the SNR = |E g|^2 / trace Cov[g] (a ratio, measured in the projection),

    trace Cov[g] = E|g|^2 / (1 + SNR)                                   (exact scale)

For the unbiased estimators the SNR is at most about 1e-2, so this puts their exact traces
within about 1 % of E|g|^2 / (1 + SNR) whatever the projection's error in the SNR. The table
compares each trace ratio between estimators in the projection with the same ratio at the exact
scale: where they differ, the projection's estimator-dependent scale (``projection_check`` =
mean |P g|^2 / mean |g|^2) moves the ratio, an error the bootstrap intervals do not contain.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "lm_variance"
PAIRS = (("reinforce-future", "analytic-future"), ("reinforce", "analytic-future"), ("analytic-future", "analytic"))


def exact_trace(m: dict) -> float:
    """trace Cov[g] at the exact scale: E|g|^2 / (1 + SNR) (module docstring)."""
    return m["exact_second_moment"] / (1 + max(m["snr"], 0.0))


def projection_table(folder: Path = RESULTS) -> str:
    """Per measured cell: projected / exact trace ratio of each pair, and projection_check's range."""
    summaries = [s for s in json.loads((folder / "summary.json").read_text()) if s["kl_pi_ref"] > 0]
    rows = [
        "Each cell: trace ratio in the projection / at the exact scale (E|g|^2 / (1 + SNR)); last column: the "
        "range over estimators of mean |P g|^2 / mean |g|^2.",
        "",
        "| policy, regime | " + " | ".join(f"`{a}` / `{b}`" for a, b in PAIRS) + " | projection_check |",
        "|---|" + "---|" * (len(PAIRS) + 1),
    ]
    for s in summaries:
        est = s["estimators"]
        cells = [f"{est[a]['trace'] / est[b]['trace']:.3g} / {exact_trace(est[a]) / exact_trace(est[b]):.3g}" for a, b in PAIRS]
        checks = [m["projection_check"] for m in est.values() if m["projection_check"] == m["projection_check"]]
        rows.append(f"| {s['policy']} {s['regime']} | " + " | ".join(cells) + f" | {min(checks):.2f}-{max(checks):.2f} |")
    return "\n".join(rows)
