"""The LM gradient-variance study's statistics, tables and plot, from ``results/lm_variance/raw``.

Per (policy, regime) and estimator e, over the n i.i.d. sequences (``studies.lm_variance``), with
g_i the exact output-layer gradient of sequence i and P g_i its fixed random projection. A fixed
projection scales squared norms by a factor near the same for every estimator (the hidden states
share dominant directions; ``projection_check`` = mean |P g|^2 / mean |g|^2 is reported), so every
statistic below is computed in the projection, where ratios between estimators (SNR, cosines,
crossover batch sizes) do not depend on that factor; the exact E|g|^2 is reported beside them.

- total variance trace Cov[g]: the sample variance of P g (ddof = 1; per sequence: a batch of n
  has 1/n of it);
- |E g|^2 = |mean|^2 - trace / n, unbiased; SNR = |E g|^2 / trace Cov[g];
- the common mean m_U: the average of the means of the estimators unbiased in the regime (their
  expectations are all grad KL), and each estimator's cosine to it;
- |bias|^2 = |E[g_e - g_U]|^2 with g_U the per-sequence average of the unbiased estimators,
  estimated without its noise from the paired differences d (the same sequences):
  |mean d|^2 - trace Cov[d] / n;
- MSE(n) = |bias|^2 + trace Cov[g] / n, and the batch size below which a biased estimator beats
  the lowest-variance unbiased one, (trace_u - trace_b) / |bias_b|^2, taken conservatively with
  the upper end of |bias_b|^2's interval.

95% intervals: bootstrap over sequences (the same resampled indices for every estimator),
``N_BOOT`` resamples with a fixed seed, as the 2.5-97.5% spread of the resampled statistic around
its bootstrap mean placed around the point estimate (resampling with replacement shifts the
noise-corrected statistics by about trace / n, which this recentring removes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from studies.cli_checks import read_json
from studies.lm_variance_records import load_raw
from studies.moments_report import crossover

RESULTS = Path(__file__).resolve().parents[1] / "results" / "lm_variance"
N_BOOT = 500
BATCH_SIZES = (1, 4, 16, 64)
UNBIASED = {
    "on": ("reinforce", "reinforce-future", "reinforce-future-is", "analytic-future", "analytic-future-is"),
    "off": ("reinforce-future-is", "analytic-future-is", "reinforce-future[importance=sequence]", "analytic-future[importance=sequence]"),
}


def statistics(projected: np.ndarray, exact_sq: np.ndarray, labels: list[str], regime: str) -> dict[str, dict[str, float]]:
    """The module docstring's statistics for [n, E, K] projections and [n, E] exact squared norms."""
    n = projected.shape[0]
    u = [labels.index(name) for name in UNBIASED[regime]]
    mean = projected.mean(0)
    trace = projected.var(0, ddof=1).sum(-1)
    mean_sq = (mean**2).sum(-1) - trace / n
    common = mean[u].mean(0)
    diffs = projected - projected[:, u].mean(1, keepdims=True)
    bias_sq = (diffs.mean(0) ** 2).sum(-1) - diffs.var(0, ddof=1).sum(-1) / n
    cosine = mean @ common / np.maximum(np.linalg.norm(mean, axis=-1) * np.linalg.norm(common), 1e-300)
    second = exact_sq.mean(0)
    return {
        label: {
            "trace": float(trace[e]),
            "mean_sq": float(mean_sq[e]),
            "snr": float(mean_sq[e] / trace[e]) if trace[e] > 0 else float("nan"),
            "cosine": float(cosine[e]),
            "bias_sq": float(bias_sq[e]),
            "exact_second_moment": float(second[e]),
            "projection_check": float((projected[:, e] ** 2).sum(-1).mean() / second[e]) if second[e] > 0 else float("nan"),
        }
        for e, label in enumerate(labels)
    }


def summarise(path: Path) -> dict:
    """Point estimates and bootstrap intervals of one raw file."""
    data, meta = load_raw(path)
    projected, exact = data["projected"].double().numpy(), data["exact_norm_sq"].double().numpy()
    labels, regime = meta["estimators"], meta["regime"]
    point = statistics(projected, exact, labels, regime)
    rng = np.random.default_rng(0)
    n = projected.shape[0]
    boots = [statistics(projected[idx], exact[idx], labels, regime) for idx in (rng.integers(0, n, n) for _ in range(N_BOOT))]
    for label in labels:
        for key in ("trace", "snr", "cosine", "bias_sq"):
            values = np.array([b[label][key] for b in boots])
            if not np.isfinite(values).any():
                point[label][key + "_ci"] = [float("nan"), float("nan")]
                continue
            shift = point[label][key] - np.nanmean(values)
            point[label][key + "_ci"] = [float(np.nanpercentile(values, 2.5) + shift), float(np.nanpercentile(values, 97.5) + shift)]
    out = {
        "policy": meta["policy"],
        "regime": regime,
        "n_sequences": n,
        "seconds": meta["seconds"],
        "kl_pi_ref": float(data["kl"].double().mean()),
        "mean_tokens": float(data["n_tokens"].double().mean()),
        "estimators": point,
    }
    if "log_ratio" in data:
        out["kl_mu_pi"] = float(-data["log_ratio"].double().mean())
    out["max_exact_norm_sq"] = {label: float(exact[:, e].max()) for e, label in enumerate(labels)}
    return out


def load_summaries(folder: Path = RESULTS) -> list[dict]:
    path = folder / "summary.json"
    return read_json(path) if os.path.lexists(path) else []


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    if abs(x) < 1e-12:
        return "0"
    return f"{x:.3g}" if 1e-2 <= abs(x) < 1e4 else f"{x:.2e}"


def _measured(summaries: list[dict]) -> list[dict]:
    return [s for s in summaries if s["policy"] != "reference"]


def _column(s: dict) -> str:
    title = f"{s['policy']} {s['regime']} (KL {s['kl_pi_ref']:.2f}"
    return title + (f", KL(mu\\|\\|pi) {s['kl_mu_pi']:.3f})" if "kl_mu_pi" in s else ")")


def _table(summaries: list[dict], cell) -> str:
    shown = _measured(summaries)
    if not shown:
        return "(no results yet)"
    labels = list(dict.fromkeys(label for s in shown for label in s["estimators"]))
    rows = ["| estimator | " + " | ".join(_column(s) for s in shown) + " |", "|---|" + "---|" * len(shown)]
    for label in labels:
        rows.append(f"| `{label}` | " + " | ".join(cell(s["estimators"][label]) if label in s["estimators"] else "" for s in shown) + " |")
    return "\n".join(rows)


def _ci(m: dict, key: str) -> str:
    lo, hi = m[key + "_ci"]
    return f"{_fmt(m[key])} [{_fmt(lo)}, {_fmt(hi)}]"


def variance_table(folder: Path = RESULTS) -> str:
    """trace Cov[g] per sequence of the output-layer gradient, with 95% bootstrap intervals."""
    return _table(load_summaries(folder), lambda m: _ci(m, "trace"))


def snr_cosine_table(folder: Path = RESULTS) -> str:
    """SNR |E g|^2 / trace Cov[g] and cosine of E g to the unbiased estimators' common mean."""
    return _table(load_summaries(folder), lambda m: f"{_ci(m, 'snr')}; cos {_ci(m, 'cosine')}")


def bias_table(folder: Path = RESULTS) -> str:
    """|bias|^2 against the unbiased estimators' common mean (paired), 95% bootstrap intervals."""
    return _table(load_summaries(folder), lambda m: _ci(m, "bias_sq"))


def recommendation_table(folder: Path = RESULTS) -> str:
    """Per policy and regime: the lowest-variance unbiased estimator, the lowest-MSE estimator per
    batch size (point estimates, negative |bias|^2 taken as 0), and the biased estimator that beats
    the former up to the largest batch size, with the upper end of its |bias|^2 interval (a lower
    bound on that batch size)."""
    shown = _measured(load_summaries(folder))
    if not shown:
        return "(no results yet)"
    rows = [
        "| policy, regime | lowest-variance unbiased (trace) | " + " | ".join(f"lowest MSE, n={n}" for n in BATCH_SIZES)
        + " | biased estimator that wins longest | it wins for n < |",
        "|---|---|" + "---|" * len(BATCH_SIZES) + "---|---|",
    ]
    for s in shown:
        est = s["estimators"]
        unbiased = [k for k in UNBIASED[s["regime"]] if k in est]
        best_u = min(unbiased, key=lambda k: est[k]["trace"])
        upper = lambda k: max(est[k]["bias_sq_ci"][1], 0.0) if k not in unbiased else 0.0  # noqa: E731
        best = [min(est, key=lambda k: max(est[k]["bias_sq"], 0.0) * (k not in unbiased) + est[k]["trace"] / n) for n in BATCH_SIZES]
        crossings = {k: crossover({**v, "bias_sq": upper(k)}, est[best_u]) for k, v in est.items() if k not in unbiased}
        best_b = max(crossings, key=crossings.get)
        rows.append(
            "| " + " | ".join([
                _column(s), f"`{best_u}` ({_fmt(est[best_u]['trace'])})", *(f"`{b}`" for b in best),
                f"`{best_b}` (\\|bias\\|^2 {_ci(est[best_b], 'bias_sq')}, trace {_fmt(est[best_b]['trace'])})",
                f">= {crossings[best_b]:.1f}",
            ]) + " |"
        )  # fmt: skip
    return "\n".join(rows)


def reference_line(folder: Path = RESULTS) -> str:
    """What the reference policy (pi = pi_ref) gives: every estimator but k1-loss is 0 there."""
    ref = next((s for s in load_summaries(folder) if s["policy"] == "reference"), None)
    if ref is None:
        return "(no results yet)"
    nonzero = {k: v for k, v in ref["max_exact_norm_sq"].items() if v > 1e-6}
    zero = [k for k in ref["max_exact_norm_sq"] if k not in nonzero]
    return (
        f"At pi = pi_ref ({ref['n_sequences']} sequences): the largest |g|^2 of {len(zero)} estimators is below 1e-6 "
        f"(0 up to float32 rounding); nonzero: " + ", ".join(f"`{k}` (trace {_fmt(ref['estimators'][k]['trace'])})" for k in nonzero) + "."
    )


def compute_line(folder: Path = RESULTS) -> str:
    summaries = load_summaries(folder)
    seconds = sum(s["seconds"] for s in summaries)
    n = sum(s["n_sequences"] for s in summaries)
    checks = [m["projection_check"] for s in _measured(summaries) for m in s["estimators"].values() if np.isfinite(m["projection_check"])]
    check = f"; projected / exact mean squared norm: {min(checks):.2f} to {max(checks):.2f} over all estimators and cells" if checks else ""
    return f"{n} sequences, {seconds / 60:.0f} min of one shared CPU thread (sampling and all estimators){check}."


def _plot(summaries: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _measured(summaries)
    if not shown:
        return
    labels = list(dict.fromkeys(label for s in shown for label in s["estimators"]))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for j, s in enumerate(shown):
        xs = [i + (j - len(shown) / 2) * 0.12 for i, label in enumerate(labels) if label in s["estimators"]]
        ms = [s["estimators"][label] for label in labels if label in s["estimators"]]
        ys = np.array([m["trace"] for m in ms])
        err = np.abs(np.array([m["trace_ci"] for m in ms]).T - ys)
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=3, label=_column(s).replace("\\", ""))
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="trace Cov[g] per sequence (output layer)", title="KL-gradient variance on SmolLM2-135M, IMDB")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "variance.png", dpi=110)
    plt.close(fig)


def write_report(raw: Path, folder: Path = RESULTS) -> None:
    """``summary.json`` from every raw file in ``raw``, then ``table.md`` and ``variance.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(path) for path in sorted(raw.glob("*.safetensors"))]
    order = {"reference": 0}
    summaries.sort(key=lambda s: (order.get(s["policy"], 1), -float(s["policy"].split("-b")[-1]) if "-b" in s["policy"] else 0, s["regime"] != "on"))
    (folder / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n")
    sections = [
        "# LM gradient variance (generated by `python -m studies.lm_variance --report`)",
        compute_line(folder), reference_line(folder),
        "## trace Cov[g] per sequence", variance_table(folder),
        "## SNR and cosine to the unbiased estimators' common mean", snr_cosine_table(folder),
        "## |bias|^2 against the common mean", bias_table(folder),
        "## Recommendation", recommendation_table(folder),
    ]  # fmt: skip
    (folder / "table.md").write_text("\n\n".join(sections) + "\n")
    _plot(summaries, folder)


SMALL_BATCH = RESULTS.parent / "lm_small_batch"


def small_batch_table(folder: Path = SMALL_BATCH) -> str:
    """The paired LM comparison at 4 sequences per rollout (``configs/study_lm_small_batch.yaml``):
    ``studies.lm_report``'s table and paired differences against k1 in the reward."""
    from studies.lm_grid import VARIANTS
    from studies.lm_report import aggregate, compute_summary, load_records, paired_table, table

    records, reference = load_records(folder)
    if not records:
        return "(no run has finished yet)"
    labels = {name: variant.label for name, variant in VARIANTS.items()}
    order = list(VARIANTS)
    return "\n".join([
        table(aggregate(records, order), labels, reference),
        "Paired against k1 in the reward at the same seed (variant - k1):\n",
        paired_table(records, labels, order, "k1"),
        compute_summary(records).strip(),
    ])  # fmt: skip
