"""The exact-moment study's tables and plots, regenerated from ``results/moments/cells`` alone.

Every number is a mean over the instance seeds of a cell (3 random problems per sweep point):
|bias|^2, trace Cov[g] and lambda_max(Cov[g]) of the per-sequence gradient estimate g, and
MSE(n) = |bias|^2 + trace / n for a batch of n sequences (``studies.moments_exact``). The
functions returning Markdown are the generated blocks of ``docs/variance.md``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from studies.cli_checks import read_json
from studies.moments_grid import BASE

RESULTS = Path(__file__).resolve().parents[1] / "results" / "moments"
BATCH_SIZES = (1, 4, 16, 64, 256)
# Regimes of the recommendation table: (name, sweep, staleness s of mu_s).
REGIMES = (
    ("on-policy, one step per batch", "beta", None),
    ("K steps per batch (mu_0.1)", "stale", 0.1),
    ("stale mu (mu_0.4)", "stale", 0.4),
    ("offline, mu = pi_ref (mu_1)", "stale", 1.0),
)
SHOWN_OFF_POLICY = (
    "reinforce-future-is", "analytic-future-is", "reinforce-future[importance=sequence]",
    "analytic-future[importance=sequence]", "reinforce-future", "reinforce-future[importance=token]",
    "analytic-future", "analytic-is", "k3+is", "k3-loss",
)  # fmt: skip


def load_cells(folder: Path = RESULTS) -> list[dict]:
    return [read_json(path) for path in sorted((folder / "cells").glob("*.json"))]


def _point(cell: dict) -> tuple:
    return (cell["sweep"], cell["vocab"], cell["length"], cell["beta"], cell["staleness"], cell["clip"])


def aggregate(cells: list[dict]) -> dict[tuple, dict]:
    """Per sweep point: seed-mean KLs and, per estimator label, seed-mean moments."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[_point(cell)].append(cell)
    points = {}
    for key, group in groups.items():
        estimators: dict[str, dict] = {}
        for row in group[0]["estimators"]:
            rows = [next(r for r in cell["estimators"] if r["label"] == row["label"]) for cell in group]
            estimators[row["label"]] = {
                "unbiased": row["unbiased"],
                **{k: float(np.mean([r[k] for r in rows])) for k in ("bias_sq", "trace", "top_eigenvalue", "cosine_to_grad_kl")},
            }
        points[key] = {
            "n_seeds": len(group),
            "kl_pi_ref": float(np.mean([c["kl_pi_ref"] for c in group])),
            "kl_mu_pi": float(np.mean([c["kl_mu_pi"] for c in group])),
            "grad_kl_sq": float(np.mean([c["grad_kl_sq"] for c in group])),
            "estimators": estimators,
        }
    return points


def _fmt(x: float) -> str:
    if x == 0 or abs(x) < 1e-12:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _sweep(points: dict, sweep: str) -> list[tuple[tuple, dict]]:
    return sorted(((k, v) for k, v in points.items() if k[0] == sweep), key=lambda kv: [x if x is not None else -1 for x in kv[0][1:]])


def _base(points: dict) -> dict:

    return points[("beta", BASE["vocab"], BASE["length"], BASE["beta"], None, None)]


def on_policy_table(folder: Path = RESULTS) -> str:
    """Every estimator on-policy at the base problem (V = T = 3, beta = 0.3, pi = pi*)."""
    base = _base(aggregate(load_cells(folder)))
    rows = [
        f"|grad KL|^2 = {_fmt(base['grad_kl_sq'])}, KL(pi || pi_ref) = {base['kl_pi_ref']:.2f} nats (means over {base['n_seeds']} seeds).",
        "",
        "| estimator | unbiased | \\|bias\\|^2 | trace Cov[g] | lambda_max | MSE(1) | MSE(16) | MSE(256) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted(base["estimators"].items(), key=lambda kv: kv[1]["bias_sq"] + kv[1]["trace"] / 16):
        mse = [m["bias_sq"] + m["trace"] / n for n in (1, 16, 256)]
        cells = [f"`{name}`", "yes" if m["unbiased"] else "no", _fmt(m["bias_sq"]), _fmt(m["trace"]), _fmt(m["top_eigenvalue"]), *map(_fmt, mse)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def growth_table(folder: Path = RESULTS) -> str:
    """trace Cov[g] of every estimator along the T, V and beta sweeps (on-policy)."""
    points = aggregate(load_cells(folder))
    sweeps = [("T", 2, "T"), ("V", 1, "V"), ("beta", 3, "beta")]
    columns = [(label, key[index], value) for sweep, index, label in sweeps for key, value in _sweep(points, sweep)]
    names = list(columns[0][2]["estimators"])
    header = "| estimator | " + " | ".join(f"{label}={x:g}" for label, x, _ in columns) + " |"
    rows = [
        "KL(pi || pi_ref) per column: " + ", ".join(f"{label}={x:g}: {v['kl_pi_ref']:.2f}" for label, x, v in columns) + ".",
        "",
        header,
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        rows.append(f"| `{name}` | " + " | ".join(_fmt(v["estimators"][name]["trace"]) for _, _, v in columns) + " |")
    return "\n".join(rows)


def stale_table(folder: Path = RESULTS) -> str:
    """|bias|^2 / trace of the off-policy estimators as mu_s gets staler (V = T = 3, beta = 0.3)."""
    points = _sweep(aggregate(load_cells(folder)), "stale")
    rows = [
        "| estimator | " + " | ".join(f"s={k[4]:g}, KL(mu\\|\\|pi)={v['kl_mu_pi']:.2f}" for k, v in points) + " |",
        "|---|" + "---|" * len(points),
    ]
    for name in SHOWN_OFF_POLICY:
        cells = [f"{_fmt(v['estimators'][name]['bias_sq'])} / {_fmt(v['estimators'][name]['trace'])}" for _, v in points]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "Each cell: \\|bias\\|^2 / trace Cov[g].\n\n" + "\n".join(rows)


def _without_clip(label: str) -> str:
    """``name[importance=sequence,weight_clip=2.0]`` -> ``name[importance=sequence]``."""
    name, _, options = label.partition("[")
    kept = [o for o in options.rstrip("]").split(",") if o and not o.startswith("weight_clip=")]
    return name + (f"[{','.join(kept)}]" if kept else "")


def clip_table(folder: Path = RESULTS) -> str:
    """weight_clip = c on offline data (mu = pi_ref): |bias|^2 / trace, and MSE(16)."""
    points = _sweep(aggregate(load_cells(folder)), "clip")
    names = [_without_clip(name) for name in points[0][1]["estimators"]]
    rows = ["| estimator | " + " | ".join(f"c={k[5]:g}" for k, _ in points) + " |", "|---|" + "---|" * len(points)]
    for i, name in enumerate(names):
        cells = []
        for _, v in points:
            m = list(v["estimators"].values())[i]
            cells.append(f"{_fmt(m['bias_sq'])} / {_fmt(m['trace'])} ({_fmt(m['bias_sq'] + m['trace'] / 16)})")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    unclipped = _sweep(aggregate(load_cells(folder)), "stale")
    offline = next(v for k, v in unclipped if k[4] == 1.0)
    reference = ", ".join(
        f"`{n}` {_fmt(offline['estimators'][n]['trace'])} ({_fmt(offline['estimators'][n]['bias_sq'] + offline['estimators'][n]['trace'] / 16)})"
        for n in ("reinforce-future-is", "analytic-future-is")
    )
    return "Each cell: \\|bias\\|^2 / trace Cov[g] (MSE(16)). Unclipped, unbiased: " + reference + ".\n\n" + "\n".join(rows)


def crossover(biased: dict, unbiased: dict) -> float:
    """The batch size below which ``biased`` has the lower MSE: (tr_u - tr_b) / |bias_b|^2
    (0 if it never has; inf if it is unbiased too)."""
    gain = unbiased["trace"] - biased["trace"]
    if gain <= 0:
        return 0.0
    return gain / biased["bias_sq"] if biased["bias_sq"] > 0 else float("inf")


def regime_summary(point: dict) -> dict:
    """Best unbiased estimator, lowest-MSE estimator per batch size, and the biased estimator with
    the largest crossover batch size against the best unbiased one."""
    est = point["estimators"]
    unbiased = {k: v for k, v in est.items() if v["unbiased"]}
    best_u = min(unbiased, key=lambda k: unbiased[k]["trace"])
    best = {n: min(est, key=lambda k: est[k]["bias_sq"] + est[k]["trace"] / n) for n in BATCH_SIZES}
    crossings = {k: crossover(v, est[best_u]) for k, v in est.items() if not v["unbiased"]}
    best_b = max(crossings, key=crossings.get)
    return {"best_unbiased": best_u, "best_by_n": best, "biased": best_b, "crossover": crossings[best_b]}


def recommendation_table(folder: Path = RESULTS) -> str:
    """Per regime: the best unbiased estimator, the lowest-MSE one per batch size, and the batch
    size below which the best biased low-variance estimator wins."""

    points = aggregate(load_cells(folder))
    rows = [
        "| regime | KL(mu \\|\\| pi) | lowest-variance unbiased (trace) | " + " | ".join(f"lowest MSE, n={n}" for n in BATCH_SIZES)
        + " | biased estimator that wins longest | it wins for n < |",
        "|---|---|---|" + "---|" * len(BATCH_SIZES) + "---|---|",
    ]
    for name, sweep, s in REGIMES:
        point = points[(sweep, BASE["vocab"], BASE["length"], BASE["beta"], s, None)]
        summary = regime_summary(point)
        est = point["estimators"]
        cells = [
            name,
            f"{point['kl_mu_pi']:.2f}",
            f"`{summary['best_unbiased']}` ({_fmt(est[summary['best_unbiased']]['trace'])})",
            *(f"`{summary['best_by_n'][n]}`" for n in BATCH_SIZES),
            f"`{summary['biased']}` (\\|bias\\|^2 {_fmt(est[summary['biased']]['bias_sq'])}, trace {_fmt(est[summary['biased']]['trace'])})",
            f"{summary['crossover']:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(points: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("reinforce", "reinforce-future", "analytic-future", "analytic", "k3-loss", "k2-loss", "k3-reward")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (sweep, index, label) in zip(axes[:3], (("T", 2, "length T"), ("V", 1, "vocabulary V"), ("beta", 3, "beta"))):
        series = _sweep(points, sweep)
        xs = [k[index] for k, _ in series]
        for name in shown:  # exact zeros (the analytic terms at T = 1) are left off the log scale
            ys = [v["estimators"][name]["trace"] for _, v in series]
            ax.plot(xs, [y if y > 1e-12 else np.nan for y in ys], marker="o", label=name)
        ax.set(xscale="log" if sweep == "beta" else "linear", yscale="log", xlabel=label, ylabel="trace Cov[g] (per sequence)")
        ax.set_title(f"on-policy, vs {label}")
    series = _sweep(points, "stale")
    xs = [v["kl_mu_pi"] for _, v in series]
    for name in SHOWN_OFF_POLICY[:6]:
        axes[3].plot(xs, [v["estimators"][name]["bias_sq"] + v["estimators"][name]["trace"] / 16 for _, v in series], marker="o", label=name)
    axes[3].set(xscale="log", yscale="log", xlabel="KL(mu || pi), nats", ylabel="MSE(16)", title="off-policy, y ~ mu_s")
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "moments.png", dpi=110)
    plt.close(fig)


def write_report(folder: Path = RESULTS) -> None:
    """``table.md`` (every table above) and ``moments.png`` under ``folder``."""
    points = aggregate(load_cells(folder))
    sections = [
        "# Exact moments (generated by `python -m studies.moments --report`)",
        "## On-policy, base problem", on_policy_table(folder),
        "## trace Cov[g] vs T, V, beta", growth_table(folder),
        "## Off-policy, mu_s", stale_table(folder),
        "## weight_clip", clip_table(folder),
        "## Recommendation", recommendation_table(folder),
    ]  # fmt: skip
    (folder / "table.md").write_text("\n\n".join(sections) + "\n")
    _plot(points, folder)
