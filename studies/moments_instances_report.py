"""Per-problem statistics of the exact moments over many instances (``studies.moments_instances``).

Every table reads ``results/moments_instances/cells`` alone. A sweep point holds one problem per
instance seed; per problem, exact |bias|^2 and trace Cov[g] give MSE(n) = |bias|^2 + trace / n.
Instead of means of heavy-tailed quantities, a cell shows the median and the 10 % and 90 %
quantiles over the problems (``med [q10, q90]``), or the share of problems where a ranking holds.

- **Degenerate problems.** Where |grad KL|^2 < ``FLOOR`` (pi* nearly deterministic, or pi* near
  pi_ref), ratios to |grad KL|^2 and crossovers are meaningless: such problems are counted in the
  ``flagged`` column and left out of every statistic of their point.
- **Ties.** Estimators that coincide in a regime (e.g. ``analytic-future`` and
  ``analytic-future-is`` on-policy) have equal moments up to rounding; a ranking counts values
  within a relative ``TIE`` as equal, and a "lowest" is credited to the first in ``ESTIMATORS`` order.
- **Crossover.** A biased b beats the problem's lowest-variance unbiased u exactly for
  n < n* = (trace_u - trace_b) / |bias_b|^2 (0 if trace_b >= trace_u).

The headline numbers that docs/variance.md states come from these functions through
``studies.moments_claims`` (``python -m studies.moments_claims`` prints them all).
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np

import kl_estimators

RESULTS = Path(__file__).resolve().parents[1] / "results" / "moments_instances"
FLOOR = 1e-4
TIE = 1e-9
BATCH_SIZES = (1, 4, 16, 64, 256)
SHOWN_CLIPS = (1.0, 2.0, 5.0)
CLIP_BATCHES = (4, 16, 64, 256)
KL_SWEEPS = ("kl0.25", "kl1", "kl2")


@lru_cache(maxsize=4)
def load(folder: Path = RESULTS) -> tuple[dict, ...]:
    """Every record of every instance file (feasible or not)."""
    return tuple(record for path in sorted((folder / "cells").glob("seed*.json")) for record in json.loads(path.read_text()))


def _key(record: dict) -> tuple:
    return (record["sweep"], record["vocab"], record["length"], record["beta"] if record["sweep"] == "beta" else None, record["staleness"])


def groups(folder: Path = RESULTS) -> dict[tuple, list[dict]]:
    """Sweep point -> its feasible problems (one per seed), in seed order."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for record in load(folder):
        if record["feasible"]:
            out[_key(record)].append(record)
    return dict(out)


def infeasible(folder: Path = RESULTS) -> dict[tuple, int]:
    """Sweep point -> number of instances whose KL level is unreachable."""
    out: dict[tuple, int] = defaultdict(int)
    for record in load(folder):
        if not record["feasible"]:
            out[_key(record)] += 1
    return dict(out)


def split(problems: list[dict]) -> tuple[list[dict], int]:
    """(problems with |grad KL|^2 >= FLOOR, number flagged degenerate)."""
    kept = [p for p in problems if p["grad_kl_sq"] >= FLOOR]
    return kept, len(problems) - len(kept)


def mse(problem: dict, name: str, n: float) -> float:
    bias_sq, trace = problem["estimators"][name]
    return bias_sq + trace / n


def trace(problem: dict, name: str) -> float:
    return problem["estimators"][name][1]


def _order(names) -> list[str]:
    """Labels in ``ESTIMATORS`` order, option-carrying labels after their base estimator."""
    rank = {name: i for i, name in enumerate(kl_estimators.ESTIMATORS)}
    return sorted(names, key=lambda label: (rank[label.split("[")[0]], label))


def lowest(values: dict[str, float]) -> str:
    """The label of the smallest value; ties (within ``TIE``) go to the first in ``_order``."""
    best = min(values.values())
    return next(name for name in _order(values) if values[name] <= best + TIE * abs(best))


def share(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else float("nan")


def strictly_below(a: float, b: float) -> bool:
    """a < b beyond ties."""
    return a < b - TIE * abs(b)


def quantiles(values) -> tuple[float, float, float]:
    """(median, q10, q90)."""
    values = np.asarray(list(values), dtype=float)
    return float(np.median(values)), float(np.quantile(values, 0.1)), float(np.quantile(values, 0.9))


def _fmt(x: float) -> str:
    if x != x:
        return "-"
    if x == float("inf"):
        return "inf"
    if x == 0 or abs(x) < 1e-12:
        return "0"
    return f"{x:.2g}" if abs(x) < 1e-2 else (f"{x:.3g}" if abs(x) < 1e4 else f"{x:.1e}")


def _q(values) -> str:
    values = list(values)
    if not values:
        return "-"
    med, lo, hi = quantiles(values)
    return f"{_fmt(med)} [{_fmt(lo)}, {_fmt(hi)}]"


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}%"


def best_unbiased(problem: dict) -> str:
    """The problem's lowest-trace unbiased estimator."""
    return lowest({name: trace(problem, name) for name in problem["unbiased"]})


def crossover(problem: dict, biased: str) -> float:
    """n* of ``biased`` against the problem's lowest-trace unbiased estimator (module docstring)."""
    bias_sq, tr_b = problem["estimators"][biased]
    gain = trace(problem, best_unbiased(problem)) - tr_b
    if gain <= 0:
        return 0.0
    return gain / bias_sq if bias_sq > 0 else float("inf")


def ratio(problem: dict, a: str, b: str) -> float:
    return trace(problem, a) / trace(problem, b)


def _on_policy_points(folder: Path) -> list[tuple[str, tuple, list[dict]]]:
    g = groups(folder)
    rows = [(f"T={t}", ("T", 3, t, None, None)) for t in range(1, 7)]
    rows += [(f"V={v}", ("V", v, 3, None, None)) for v in range(2, 7)]
    rows += [(f"beta={b:g}", ("beta", 3, 3, b, None)) for b in (0.1, 0.3, 1.0, 3.0)]
    return [(name, key, g[key]) for name, key in rows]


def _row(name: str, problems: list[dict], unfeasible: int = 0) -> list[str]:
    kept, flagged = split(problems)
    at_16 = [lowest({k: mse(p, k, 16) for k in p["estimators"]}) for p in kept]
    return [
        name,
        f"{len(kept)}" + (f" ({unfeasible} unreachable)" if unfeasible else ""),
        str(flagged),
        _q(p["kl_pi_ref"] for p in kept),
        _q(ratio(p, "analytic-future", "reinforce-future") for p in kept),
        _pct(share(best_unbiased(p) == "analytic-future" for p in kept)),
        _pct(share(strictly_below(trace(p, "reinforce-future"), trace(p, "reinforce")) for p in kept)),
        _pct(share(strictly_below(trace(p, "reinforce"), trace(p, "reinforce-future")) for p in kept)),
        _q(p["estimators"]["analytic"][0] / p["grad_kl_sq"] for p in kept),
        _q(crossover(p, "analytic") for p in kept),
        _pct(share(a == "analytic" for a in at_16)),
    ]


_HEADER = (
    "| point | problems | flagged | KL(pi \\|\\| pi_ref) | trace af / rf | af lowest unbiased | rf < reinforce | reinforce < rf "
    "| analytic \\|bias\\|^2 / \\|grad KL\\|^2 | analytic's crossover n* | analytic lowest MSE(16) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
_LEGEND = (
    "af = `analytic-future`, rf = `reinforce-future`; `med [q10, q90]` over the problems of a point; "
    f"percentages are shares of the problems (ties excluded from both orders); flagged: |grad KL|^2 < {FLOOR:g}, "
    "left out. analytic's crossover: the batch size below which `analytic` has the lower MSE than "
    "the problem's lowest-variance unbiased estimator."
)


def on_policy_table(folder: Path = RESULTS) -> str:
    """Per sweep point at beta = 0.3 (or swept), on-policy: per-problem statistics."""
    rows = [_LEGEND, "", _HEADER]
    for name, _, problems in _on_policy_points(folder):
        rows.append("| " + " | ".join(_row(name, problems)) + " |")
    return "\n".join(rows)


def _kl_points(folder: Path) -> list[tuple[str, tuple]]:
    out = []
    for sweep in KL_SWEEPS:
        out += [(f"KL {sweep[2:]}, T={t}", (sweep, 3, t, None, None)) for t in range(1, 6)]
        out += [(f"KL {sweep[2:]}, V={v}", (sweep, v, 3, None, None)) for v in range(2, 7) if v != 3]
    return out


def fixed_kl_table(folder: Path = RESULTS) -> str:
    """The same statistics with beta chosen per problem so that KL(pi* || pi_ref) is fixed."""
    g, bad = groups(folder), infeasible(folder)
    rows = [
        "beta per problem such that KL(pi*_beta || pi_ref) = 0.25, 1 or 2 nats (T at V = 3, V at T = 3); "
        "a level above a problem's largest reachable KL is counted as unreachable. Columns as above.",
        "",
        _HEADER,
    ]
    for name, key in _kl_points(folder):
        rows.append("| " + " | ".join(_row(name, g.get(key, []), bad.get(key, 0))) + " |")
    return "\n".join(rows)


QUANTITIES = {
    "trace af / rf": lambda p: ratio(p, "analytic-future", "reinforce-future"),
    "trace rf / reinforce": lambda p: ratio(p, "reinforce-future", "reinforce"),
    "analytic |bias|^2 / |grad KL|^2": lambda p: p["estimators"]["analytic"][0] / p["grad_kl_sq"],
    "analytic's crossover n*": lambda p: crossover(p, "analytic"),
}


def point_median(folder: Path, key: tuple, quantity) -> float:
    """Median over the non-degenerate problems of sweep point ``key`` of ``quantity``: a name of
    ``QUANTITIES`` or a function of one problem."""
    f = QUANTITIES[quantity] if isinstance(quantity, str) else quantity
    kept, _ = split(groups(folder).get(key, []))
    return quantiles(f(p) for p in kept)[0] if kept else float("nan")


def drivers(folder: Path = RESULTS) -> dict[str, dict[str, float]]:
    """Which of KL(pi* || pi_ref), T and V drives each quantity, at fixed KL: the standardised
    least-squares coefficients of the log of its point median on (log KL, T, V) jointly, over
    the fixed-KL sweep points with T >= 2 (T = 1 has no future terms; KL, T and V vary
    independently there by design), and the fit's R^2."""
    keys = [key for _, key in _kl_points(folder) if key[2] >= 2]
    x = np.array([[np.log(float(key[0][2:])), key[2], key[1]] for key in keys], dtype=float)
    xs = (x - x.mean(0)) / x.std(0)
    out = {}
    for name in QUANTITIES:
        y = np.log([point_median(folder, key, name) for key in keys])
        ys = (y - y.mean()) / y.std()
        design = np.column_stack([np.ones(len(ys)), xs])
        coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
        r2 = 1 - float(((ys - design @ coef) ** 2).sum() / (ys**2).sum())
        out[name] = {"n_points": len(keys), "log_kl": float(coef[1]), "T": float(coef[2]), "V": float(coef[3]), "r2": r2}
    return out


def _path(folder: Path, quantity: str, keys: list[tuple]) -> str:
    return " -> ".join(_fmt(point_median(folder, key, quantity)) for key in keys)


def drivers_table(folder: Path = RESULTS) -> str:
    """Per quantity, its point medians along KL at T = V = 3, along T at V = 3 and along V at T = 3
    for each KL level, and ``drivers``' coefficients."""
    d = drivers(folder)
    rows = [
        "Point medians of each per-problem quantity along one variable with the others fixed; the last "
        f"column: standardised joint least-squares coefficients of log(median) on (log KL, T, V) over the "
        f"{next(iter(d.values()))['n_points']} fixed-KL points with T >= 2, and R^2.",
        "",
        "| quantity | KL 0.25 -> 1 -> 2 (T = V = 3) | "
        + " | ".join(f"T 2 -> 5 at KL {k[2:]}" for k in KL_SWEEPS) + " | "
        + " | ".join(f"V 2 -> 6 at KL {k[2:]}" for k in KL_SWEEPS) + " | coefficients: log KL, T, V (R^2) |",
        "|---|---|" + "---|" * (2 * len(KL_SWEEPS)) + "---|",
    ]
    for name, c in d.items():
        cells = [_path(folder, name, [(k, 3, 3, None, None) for k in KL_SWEEPS])]
        cells += [_path(folder, name, [(k, 3, t, None, None) for t in range(2, 6)]) for k in KL_SWEEPS]
        cells += [_path(folder, name, [(k, v, 3, None, None) for v in range(2, 7)]) for k in KL_SWEEPS]
        cells.append(f"{c['log_kl']:+.2f}, {c['T']:+.2f}, {c['V']:+.2f} ({c['r2']:.2f})")
        rows.append(f"| {name.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _clip_label(name: str, c: float) -> str:
    base, _, options = name.partition("[")
    options = options.rstrip("]")
    return f"{base}[{options + ',' if options else ''}weight_clip={c}]"


def clip_effect(problems: list[dict], name: str, c: float, n: int) -> tuple[float, float]:
    """(median of MSE_c(n) / MSE_unclipped(n), share of problems where clipping lowers MSE(n))."""
    ratios = [mse(p, _clip_label(name, c), n) / mse(p, name, n) for p in problems]
    return float(np.median(ratios)), share(r < 1 - TIE for r in ratios)


def clip_table(folder: Path = RESULTS) -> str:
    """weight_clip = c over (s, n): median MSE ratio clipped / unclipped and the share it helps."""
    from studies.moments_grid import label
    from studies.moments_instances_grid import CLIP_RUNS, CLIP_STALENESS

    g = groups(folder)
    columns = [(s, n) for s in CLIP_STALENESS for n in CLIP_BATCHES]
    points = {s: split(g[("clip", 3, 3, None, s)]) for s in CLIP_STALENESS}
    kl = " ".join(f"s={s:g}: {_fmt(quantiles(p['kl_mu_pi'] for p in points[s][0])[0])}," for s in CLIP_STALENESS).rstrip(",")
    rows = [
        "Each cell: median over the problems of MSE(n) clipped / unclipped, and the share of problems "
        f"where clipping lowers MSE(n). y ~ mu_s at V = T = 3, beta = 0.3; median KL(mu || pi) {kl} nats. "
        f"Problems per s: {', '.join(str(len(points[s][0])) for s in CLIP_STALENESS)} (flagged: "
        f"{', '.join(str(points[s][1]) for s in CLIP_STALENESS)}).",
        "",
        "| estimator | c | " + " | ".join(f"s={s:g}, n={n}" for s, n in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for estimator, options in CLIP_RUNS:
        name = label(estimator, options)
        for c in SHOWN_CLIPS:
            cells = []
            for s, n in columns:
                med, helps = clip_effect(points[s][0], name, c, n)
                cells.append(f"{med:.2f} ({_pct(helps)})")
            rows.append(f"| `{name}` | {c:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def off_policy_table(folder: Path = RESULTS) -> str:
    """Every unclipped estimator (and importance-weighted variant) along the staleness s of mu_s:
    median |bias|^2 / |grad KL|^2 and median trace over the problems."""
    from studies.moments_instances_grid import CLIP_STALENESS

    g = groups(folder)
    points = {s: split(g[("clip", 3, 3, None, s)])[0] for s in CLIP_STALENESS}
    names = _order(_unclipped(points[CLIP_STALENESS[0]][0]))
    kl = ", ".join(f"s={s:g}: {_fmt(quantiles(p['kl_mu_pi'] for p in points[s])[0])}" for s in CLIP_STALENESS)
    rows = [
        f"Each cell: median |bias|^2 / |grad KL|^2 / median trace Cov[g] over the problems (V = T = 3, beta = 0.3; "
        f"median KL(mu || pi) {kl} nats).",
        "",
        "| estimator | " + " | ".join(f"s={s:g}" for s in CLIP_STALENESS) + " |",
        "|---|" + "---|" * len(CLIP_STALENESS),
    ]
    for name in names:
        cells = [
            f"{_fmt(quantiles(p['estimators'][name][0] / p['grad_kl_sq'] for p in points[s])[0])} / "
            f"{_fmt(quantiles(trace(p, name) for p in points[s])[0])}"
            for s in CLIP_STALENESS
        ]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


REGIMES = (
    ("on-policy", ("beta", 3, 3, 0.3, None)),
    ("mu_0.2", ("clip", 3, 3, None, 0.2)),
    ("mu_0.4", ("clip", 3, 3, None, 0.4)),
    ("mu_0.7", ("clip", 3, 3, None, 0.7)),
    ("offline, mu_1 = pi_ref", ("clip", 3, 3, None, 1.0)),
)


def _unclipped(problem: dict) -> dict[str, list[float]]:
    return {k: v for k, v in problem["estimators"].items() if "weight_clip" not in k}


def _winners(labels: list[str]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for name in labels:
        counts[name] += 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    return ", ".join(f"`{name}` {_pct(k / len(labels))}" for name, k in top)


def recommendation_table(folder: Path = RESULTS) -> str:
    """Per regime (V = T = 3, beta = 0.3): the most frequent lowest-variance unbiased estimator and
    lowest-MSE estimator per batch size (unclipped estimators), with their shares of the problems,
    and the distribution of the crossover of the direct term (``analytic``; ``analytic-is`` off-policy)."""
    g = groups(folder)
    rows = [
        "Shares of the problems where the named estimator is lowest (the two most frequent; ties to the first "
        "in `ESTIMATORS` order, so on-policy `analytic-future` stands for its `-is` twin). Unclipped estimators.",
        "",
        "| regime | problems (flagged) | KL(mu \\|\\| pi) | lowest-variance unbiased | "
        + " | ".join(f"lowest MSE, n={n}" for n in BATCH_SIZES) + " | direct term's crossover n* |",
        "|---|---|---|---|" + "---|" * len(BATCH_SIZES) + "---|",
    ]
    for name, key in REGIMES:
        kept, flagged = split(g[key])
        direct = "analytic" if key[0] == "beta" else "analytic-is"
        est = [_unclipped(p) for p in kept]
        cells = [
            name, f"{len(kept)} ({flagged})", _q(p["kl_mu_pi"] for p in kept),
            _winners([lowest({k: e[k][1] for k in p["unbiased"]}) for p, e in zip(kept, est)]),
            *(_winners([lowest({k: v[0] + v[1] / n for k, v in e.items()}) for e in est]) for n in BATCH_SIZES),
            f"`{direct}` " + _q(crossover(p, direct) for p in kept),
        ]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(folder: Path, out: Path) -> None:
    """Per-problem distributions: trace af / rf and 1 + analytic's crossover along T, V (fixed
    beta) and at fixed KL, one box per point (whiskers 10-90 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(folder)
    series = [("fixed beta = 0.3", [(f"T{t}", ("T", 3, t, None, None)) for t in range(2, 7)] + [(f"V{v}", ("V", v, 3, None, None)) for v in (2, 4, 5, 6)])]
    series += [(f"KL = {k[2:]}", [(f"T{t}", (k, 3, t, None, None)) for t in range(2, 6)] + [(f"V{v}", (k, v, 3, None, None)) for v in (2, 4, 5, 6)]) for k in KL_SWEEPS]
    fig, axes = plt.subplots(2, len(series), figsize=(4.5 * len(series), 7), sharey="row")
    for column, (title, points) in enumerate(series):
        for row, (quantity, shift) in enumerate((("trace af / rf", 0.0), ("analytic's crossover n*", 1.0))):
            data = [[QUANTITIES[quantity](p) + shift for p in split(g.get(key, []))[0]] for _, key in points]
            ax = axes[row, column]
            ax.boxplot(data, whis=(10, 90), showfliers=False)
            ax.set_xticks(range(1, len(points) + 1), [name for name, _ in points])
            ylabel = ("1 + " if shift else "") + quantity  # n* = 0 (analytic never wins) stays on the log scale
            ax.set(yscale="log", title=title if row == 0 else None, ylabel=ylabel if column == 0 else None)
            if row == 0:
                ax.axhline(1.0, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(out / "instances.png", dpi=100)
    plt.close(fig)


def report_text(folder: Path = RESULTS) -> str:
    """The text of ``table.md``: every table above."""
    sections = [
        "# Exact moments over many instances (generated by `python -m studies.moments_instances --report`)",
        "## On-policy, per problem", on_policy_table(folder),
        "## At fixed KL(pi* || pi_ref)", fixed_kl_table(folder),
        "## What drives each effect", drivers_table(folder),
        "## Off-policy, every estimator", off_policy_table(folder),
        "## weight_clip over (s, n)", clip_table(folder),
        "## Recommendation", recommendation_table(folder),
    ]  # fmt: skip
    return "\n\n".join(sections) + "\n"


def write_report(folder: Path = RESULTS) -> None:
    """``table.md`` (``report_text``) and ``instances.png`` under ``folder``."""
    (folder / "table.md").write_text(report_text(folder))
    _plot(folder, folder)
