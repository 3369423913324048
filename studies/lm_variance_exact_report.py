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
  |bias|^2 of one cell has none here);
- the recommendation: the lowest-trace estimator of the grad-KL class, and the lowest-MSE
  estimator at each batch size n, with a non-positive |bias|^2 estimate of a biased class taken
  as 0 (point estimates).
"""

from __future__ import annotations

import json
from pathlib import Path

from studies import moments_report
from studies.moments_report import BATCH_SIZES

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


def lowest_mse(cell: dict, n: int) -> str:
    """The estimator with the lowest MSE(n) = max(|bias|^2, 0) + trace / n per sequence-batch of n
    (ties to the first in the cell's order, so a grad-KL twin stands for the class)."""
    est = cell["estimators"]
    return min(est, key=lambda k: max(est[k]["bias_sq"], 0.0) + est[k]["trace"] / n)


def grad_kl_members(cell: dict) -> dict[str, dict]:
    """The cell's estimators of the grad-KL class (unbiased in its regime), by name."""
    return {k: v for k, v in cell["estimators"].items() if v["class"] == "grad_kl"}


def lowest_unbiased(cell: dict) -> str:
    """The grad-KL class member with the lowest trace Cov[g]."""
    members = grad_kl_members(cell)
    return min(members, key=lambda k: members[k]["trace"])


def recommendation_table(folder: Path = RESULTS) -> str:
    """Markdown: per exact cell, the lowest-variance unbiased estimator with its trace, the
    lowest-MSE estimator at each of ``BATCH_SIZES`` and ``analytic``'s crossover (module docstring)."""
    cells = load_cells(folder)
    if not cells:
        return "No cell has been measured yet (`python -m studies.lm_variance_exact_run`)."
    head = ["cell", "KL(pi ‖ pi_ref)", "KL(mu ‖ pi)", "lowest-variance unbiased (trace)",
            *(f"lowest MSE, n={n}" for n in BATCH_SIZES), "`analytic` wins below n ="]
    rows = ["| " + " | ".join(head) + " |", "|---|---:|---:|---|" + "---|" * len(BATCH_SIZES) + "---:|"]
    for cell in cells:
        best = lowest_unbiased(cell)
        values = [cell_name(cell), f"{cell['kl_pi_ref']:.3g}", f"{cell['kl_mu_pi']:.2g}",
                  f"`{best}` ({_number(cell['estimators'][best]['trace'], 3)})",
                  *(f"`{lowest_mse(cell, n)}`" for n in BATCH_SIZES), _batch(crossover(cell))]
        rows.append("| " + " | ".join(values) + " |")
    return "\n".join(rows)


K2_FAMILY = ("k2-loss", "k1+", "k3+", "k3-ratio", "k3+is")  # on-policy: analytic's expected gradient


def _number(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits, without an exponent from 100 on (3,000 not 3e+03)."""
    return f"{float(f'{x:.{digits}g}'):,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def _span(values: list[float], digits: int = 3) -> str:
    """``a`` or ``a-b``, the range of ``values`` to ``digits`` significant digits."""
    low, high = _number(min(values), digits), _number(max(values), digits)
    return low if low == high else f"{low}-{high}"


def _seeds(cells: list[dict]) -> list[str]:
    return sorted({c["policy"].rpartition("-seed")[2] if "-seed" in c["policy"] else "0" for c in cells})


def _unbiased_lowest(cell: dict) -> tuple[bool, bool]:
    """(the reference has the lowest trace of the cell's grad-KL class, every other member's
    paired 95 % interval lies above 1)."""
    members = {k: v for k, v in grad_kl_members(cell).items() if k != cell["reference"]}
    lowest = all(v["trace_ratio_to_reference"] >= 1 for v in members.values())
    return lowest, all(v["trace_ratio_ci"][0] > 1 for v in members.values())


def _seconds(cells: list[dict]) -> str:
    """Each cell's measuring time, spanned per torch thread count (a record without ``threads``
    was measured on one)."""
    threads = sorted({c.get("threads", 1) for c in cells})
    parts = []
    for n in threads:
        span = _span([c["seconds"] for c in cells if c.get("threads", 1) == n], 2)
        parts.append(f"{span} s on {'one CPU thread' if n == 1 else f'{n} CPU threads'}")
    return "; ".join(parts)


def findings(folder: Path = RESULTS) -> str:
    """Markdown bullets: what the exact cells show, each with the share of cells it holds for
    (computed here from the committed cells, so the text cannot drift from them)."""
    cells = load_cells(folder)
    if not cells:
        return "No cell has been measured yet."
    on = [c for c in cells if c["regime"] == "on"]
    off = [c for c in cells if c["regime"] == "off"]
    seeds = _seeds(cells)
    lowest = [_unbiased_lowest(c) for c in cells]
    out = [
        f"- **Scope:** {len(cells)} cells ({len(on)} on-policy, {len(off)} off-policy), "
        f"{len({c['policy'] for c in cells})} policies, training seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}; "
        f"{cells[0]['n_sequences']} sequences per cell; KL(pi ‖ pi_ref) {_span([c['kl_pi_ref'] for c in cells], 2)} nats; "
        f"{_seconds(cells)} per cell.",
        f"- **Lowest variance of the unbiased estimators:** the reference (`analytic-future`, off-policy `analytic-future-is`) "
        f"in {sum(a for a, _ in lowest)} of {len(cells)} cells; in {sum(b for _, b in lowest)} of them every other unbiased "
        "estimator's paired 95 % interval lies above 1.",
    ]
    if on:
        by_kl = sorted(on, key=lambda c: c["kl_pi_ref"])
        pairs = ", ".join(f"{c['estimators']['reinforce-future']['trace_ratio_to_reference']:.3g} at {c['kl_pi_ref']:.2g}" for c in by_kl)
        first, last = (by_kl[i]["estimators"]["reinforce-future"] for i in (0, -1))
        disjoint = first["trace_ratio_ci"][0] > last["trace_ratio_ci"][1] or last["trace_ratio_ci"][0] > first["trace_ratio_ci"][1]
        lower = "lower" if last["trace_ratio_to_reference"] < first["trace_ratio_to_reference"] else "higher"
        trend = (f"{lower} at the largest KL than at the smallest, their 95 % intervals "
                 f"{'disjoint' if disjoint else 'overlapping'}") if len(on) > 1 else "one cell"
        out.append(
            f"- **On-policy, `reinforce-future` / `analytic-future`:** {pairs} nats ({trend}); "
            f"`reinforce` / `analytic-future`: {_span([c['estimators']['reinforce']['trace_ratio_to_reference'] for c in on])}.")
    if off:
        out.append(
            f"- **Off-policy** (KL(mu ‖ pi) {_span([c['kl_mu_pi'] for c in off], 2)} nats per sequence): `reinforce-future-is` / "
            f"`analytic-future-is` {_span([c['estimators']['reinforce-future-is']['trace_ratio_to_reference'] for c in off])}; "
            f"the unweighted `analytic-future` (biased off-policy) {_span([c['estimators']['analytic-future']['trace_ratio_to_reference'] for c in off])}.")
    analytic = [c["estimators"]["analytic"]["trace_ratio_to_reference"] for c in cells]
    resolved = [c for c in cells if c["estimators"]["analytic"]["bias_sq"] > 0]
    relative = [c["estimators"]["analytic"]["bias_sq"] / c["estimators"][c["reference"]]["mean_sq"] for c in resolved]
    line = (f"- **The direct term alone (`analytic`)** has {_span([1 / r for r in analytic], 2)}x less variance than the reference "
            f"in every cell. Its |bias|² estimate (unbiased, no interval) is positive in {len(resolved)} of {len(cells)} cells")
    if resolved:
        line += (f", {_span(relative, 2)} x |∇KL|², which puts its MSE below the reference's for batches of up to "
                 f"{_span([crossover(c) for c in resolved], 2)} sequences")
    if len(resolved) < len(cells):
        line += f"; in the other {len(cells) - len(resolved)} it is ≤ 0: {cells[0]['n_sequences']} sequences do not resolve it"
    out.append(line + ".")
    if on:
        k2 = [c["estimators"][k]["trace"] / c["estimators"]["analytic"]["trace"] for c in on for k in K2_FAMILY]
        out.append(f"- **The k2 family** ({', '.join(f'`{k}`' for k in K2_FAMILY)}: `analytic`'s expected gradient on-policy) has "
                   f"{_span(k2, 2)}x `analytic`'s variance in the {len(on)} on-policy cells.")
    snr = [c["estimators"][c["reference"]]["mean_sq"] / c["estimators"][c["reference"]]["trace"] for c in cells]
    out.append(f"- **Noise-dominated:** the reference's SNR per sequence is {_span(snr, 2)}, so a batch needs "
               f"{_span([1 / s for s in snr if s > 0], 2)} sequences before its signal equals its noise.")
    return "\n".join(out)
