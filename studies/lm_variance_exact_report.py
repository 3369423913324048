"""The exact LM statistics' tables, from ``results/lm_variance_exact/*.json``.

One JSON per (policy, regime, behaviour), written by ``python -m studies.lm_variance_exact_run``
(``studies.lm_variance_exact.ExactSums.statistics``): per estimator, the exact trace Cov[g] of its
output-layer gradient per sequence, its class's |E g|^2 and its class's |bias|^2 against grad KL
(``analytic-future``'s class), and the paired-bootstrap 95 % interval of its trace divided by
the reference's: the first of ``studies.lm_variance_exact.REPRESENTATIVES`` unbiased in the regime
(``analytic-future`` on-policy, ``analytic-future-is`` off). From these, per cell:

- the reference's SNR = |E g|^2 / trace Cov[g] (its class's |E g|^2 is |grad KL|^2);
- relative bias of ``analytic`` = |bias|^2 / |grad KL|^2;
- the batch size below which ``analytic`` has the lower MSE, with
  MSE(n) = |bias|^2 + trace / n: n* = (trace_ref - trace_a) / |bias_a|^2 (no interval: the
  |bias|^2 of one cell has none here).
"""

from __future__ import annotations

import json
from pathlib import Path

from studies import moments_report

RESULTS = Path(__file__).resolve().parents[1] / "results" / "lm_variance_exact"
RATIO_COLUMNS = ("reinforce", "reinforce-future", "analytic", "k3-ratio", "k3-loss")


def load_cells(folder: Path = RESULTS) -> list[dict]:
    """Every measured cell, ordered by policy name and then on-policy before off, by behaviour."""
    cells = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted(cells, key=lambda c: (c["policy"], c["regime"] != "on", c["behaviour"] or ""))


def cell_name(cell: dict) -> str:
    """``k1-b0.3 on`` or ``k1-b0.3 off (behaviour-5)``."""
    return f"{cell['policy']} on" if cell["regime"] == "on" else f"{cell['policy']} off ({cell['behaviour']})"


def _ratio(cell: dict, label: str) -> str:
    entry = cell["estimators"].get(label)
    if entry is None:
        return ""
    low, high = entry["trace_ratio_ci"]
    return f"{entry['trace_ratio_to_reference']:.3g} [{low:.3g}, {high:.3g}]"


def _batch(n: float) -> str:
    return "not resolved (\\|bias\\|² ≤ 0)" if n == float("inf") else f"{n:.3g}"


def crossover(cell: dict) -> float:
    """Batch size below which ``analytic``'s MSE is below the reference's (module docstring;
    ``studies.moments_report.crossover``: inf where its measured |bias|^2 is not positive)."""
    return moments_report.crossover(cell["estimators"]["analytic"], cell["estimators"][cell["reference"]])


def exact_table(folder: Path = RESULTS) -> str:
    """Markdown: one row per measured cell (module docstring), or a line saying none is yet."""
    cells = load_cells(folder)
    if not cells:
        return "No cell has been measured yet (`python -m studies.lm_variance_exact_run`)."
    head = ["cell", "n", "KL(pi ‖ pi_ref)", "KL(mu ‖ pi)", "reference", *(f"`{c}` / reference" for c in RATIO_COLUMNS),
            "reference's SNR", "`analytic` \\|bias\\|² / \\|∇KL\\|²", "`analytic` wins below n ="]
    rows = [
        f"Exact trace ratios per sequence (paired bootstrap 95 % intervals over {cells[0]['n_sequences']} "
        "sequences per cell), one training seed unless the cell's name says otherwise.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for cell in cells:
        reference = cell["estimators"][cell["reference"]]
        analytic = cell["estimators"]["analytic"]
        snr = reference["mean_sq"] / reference["trace"]
        values = [cell_name(cell), str(cell["n_sequences"]), f"{cell['kl_pi_ref']:.3g}", f"{cell['kl_mu_pi']:.2g}", f"`{cell['reference']}`",
                  *(_ratio(cell, label) for label in RATIO_COLUMNS), f"{snr:.2g}",
                  f"{analytic['bias_sq'] / reference['mean_sq']:.2g}", _batch(crossover(cell))]
        rows.append("| " + " | ".join(values) + " |")
    return "\n".join(rows)
