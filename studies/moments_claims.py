"""``python -m studies.moments_claims``: every headline number of docs/variance.md's tabular findings.

Each claim is computed from the committed per-instance files (``results/moments_instances``)
through ``studies.moments_instances_report``, with the statement it supports and its scope. The
findings and the recommendation on docs/variance.md are generated from these numbers
(``findings``, ``recommendation``: ``<!-- generated -->`` blocks, checked by
``tests/test_docs_blocks.py``), and ``ESTIMATOR_INFO``'s qualitative variance statement is checked
against them (``tests/test_moments_claims.py``), so no stated number can drift from the results.

    python -m studies.moments_claims            # every claim as JSON: value and what it is
    python -m studies.moments_claims af_base    # one claim
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache

from studies.moments_instances_report import (
    KL_SWEEPS,
    RESULTS,
    best_unbiased,
    clip_effect,
    crossover,
    drivers,
    groups,
    lowest,
    mse,
    point_median,
    quantiles,
    ratio,
    share,
    split,
    strictly_below,
    trace,
)

BASE = ("beta", 3, 3, 0.3, None)
OFFLINE = ("clip", 3, 3, None, 1.0)
FIXED_BETA = [("T", 3, t, None, None) for t in range(2, 7)] + [("V", v, 3, None, None) for v in range(2, 7)] + [
    ("beta", 3, 3, b, None) for b in (0.1, 0.3, 1.0, 3.0)
]


def _med(key: tuple, quantity) -> float:
    return point_median(RESULTS, key, quantity)


def _kept(key: tuple) -> list[dict]:
    return split(groups()[key])[0]


def _distinct(keys: list[tuple]) -> list[dict]:
    """The non-degenerate problems of ``keys``, each once (the base problem is on three sweeps)."""
    out = {}
    for key in keys:
        for p in _kept(key):
            out[(p["vocab"], p["length"], p["beta"], p["seed"])] = p
    return list(out.values())


def _point_name(key: tuple) -> str:
    if key[0] == "beta":
        return f"beta = {key[3]:g}"
    return f"T = {key[2]}" if key[0] == "T" else f"V = {key[1]}"


def _q(values) -> dict:
    med, lo, hi = quantiles(values)
    return {"median": med, "q10": lo, "q90": hi}


@lru_cache(maxsize=1)
def claims() -> dict[str, dict]:
    """name -> {"value": number or dict, "what": the quantity and its scope}."""
    base = _kept(BASE)
    af_share = {key: share(best_unbiased(p) == "analytic-future" for p in _kept(key)) for key in FIXED_BETA}
    others = {k: v for k, v in af_share.items() if k not in (BASE, ("beta", 3, 3, 0.1, None))}
    worst = min(others, key=others.get)
    on_policy = _distinct(FIXED_BETA)
    rf_lower = [strictly_below(trace(p, "reinforce-future"), trace(p, "reinforce")) for p in on_policy]
    r_lower = [strictly_below(trace(p, "reinforce"), trace(p, "reinforce-future")) for p in on_policy]
    reversed_ratios = [ratio(p, "reinforce-future", "reinforce") for p, r in zip(on_policy, r_lower) if r]
    b01 = groups()[("beta", 3, 3, 0.1, None)]
    at_025 = [(k, 3, t, None, None) for k in ("kl0.25",) for t in range(2, 6)] + [("kl0.25", v, 3, None, None) for v in (2, 4, 5, 6)]
    af_rf = "trace af / rf"
    n_star = "analytic's crossover n*"
    offline = _kept(OFFLINE)
    out = {
        "n_base": (len(base), "non-degenerate problems at the base point V = T = 3, beta = 0.3 (one per instance seed)"),
        "af_base": (af_share[BASE], "share of the base problems where analytic-future has the lowest trace of the unbiased estimators"),
        "af_worst_other": ({"share": others[worst], "point": _point_name(worst)},
                           "the lowest such share over the other fixed-beta on-policy points with T >= 2 except beta = 0.1"),
        "af_beta01": (af_share[("beta", 3, 3, 0.1, None)], "the same share at beta = 0.1"),
        "flagged_beta01": (len(b01) - len(split(b01)[0]), f"problems of {len(b01)} at beta = 0.1 with |grad KL|^2 below the floor"),
        "kl_beta01": (_q(p["kl_pi_ref"] for p in split(b01)[0]), "KL(pi* || pi_ref) at beta = 0.1"),
        "af_rf_base": (_q(ratio(p, "analytic-future", "reinforce-future") for p in base), "trace analytic-future / reinforce-future, base problems"),
        "af_rf_T": ({t: _med(("T", 3, t, None, None), af_rf) for t in (2, 6)}, "median of that ratio at T = 2 and T = 6 (beta = 0.3)"),
        "af_rf_kl": ({k[2:]: _med((k, 3, 3, None, None), af_rf) for k in KL_SWEEPS},
                     "median of that ratio at KL(pi* || pi_ref) = 0.25, 1, 2 nats, T = V = 3"),
        "af_rf_at_kl025": ({"min": min(_med(k, af_rf) for k in at_025), "max": max(_med(k, af_rf) for k in at_025)},
                           "range of its point medians over T = 2..5 and V = 2..6 at KL 0.25"),
        "drivers": ({name: {k: round(v, 2) for k, v in d.items() if k != "n_points"} for name, d in drivers().items()},
                    "standardised coefficients of log(point median) on (log KL, T, V) over the fixed-KL points, and R^2"),
        "rf_vs_reinforce": ({"problems": len(on_policy), "rf_lower": share(rf_lower), "reinforce_lower": share(r_lower),
                             "largest_reversed_ratio": max(reversed_ratios, default=float("nan"))},
                            "distinct non-degenerate on-policy problems with T >= 2 of the fixed-beta sweeps: share where "
                            "reinforce-future / reinforce has the lower trace, and the largest trace ratio rf / reinforce where reinforce is lower"),
        "analytic_bias_base": (_q(p["estimators"]["analytic"][0] / p["grad_kl_sq"] for p in base), "analytic |bias|^2 / |grad KL|^2, base problems"),
        "crossover_base": (_q(crossover(p, "analytic") for p in base), "analytic's crossover n* against the lowest-trace unbiased estimator, base problems"),
        "analytic_wins_16_base": (share(lowest({k: mse(p, k, 16) for k in p["estimators"]}) == "analytic" for p in base),
                                  "share of the base problems where analytic has the lowest MSE(16) of all estimators"),
        "crossover_kl025": ({"T2": _med(("kl0.25", 3, 2, None, None), n_star), "T5": _med(("kl0.25", 3, 5, None, None), n_star),
                             "V2": _med(("kl0.25", 2, 3, None, None), n_star), "V6": _med(("kl0.25", 6, 3, None, None), n_star)},
                            "median crossover at KL 0.25: T = 2 and 5 (V = 3), V = 2 and 6 (T = 3)"),
        "crossover_kl": ({k[2:]: _med((k, 3, 3, None, None), n_star) for k in KL_SWEEPS}, "median crossover at KL 0.25, 1, 2, T = V = 3"),
        "k2_vs_analytic": ({"largest_relative_bias_gap": max(abs(p["estimators"]["k2-loss"][0] / p["estimators"]["analytic"][0] - 1) for p in on_policy),
                            "smallest_trace_ratio": min(trace(p, "k2-loss") / trace(p, "analytic") for p in on_policy),
                            **_q(trace(p, "k2-loss") / trace(p, "analytic") for p in base)},
                           "k2-loss against analytic over the distinct on-policy problems with T >= 2: largest relative |bias|^2 "
                           "difference and smallest trace ratio; the trace ratio's quantiles at the base"),
        "k3_trace": ({"base": _med(BASE, lambda p: trace(p, "k3-loss")),
                      "beta0.1": _med(("beta", 3, 3, 0.1, None), lambda p: trace(p, "k3-loss")),
                      "beta3": _med(("beta", 3, 3, 3.0, None), lambda p: trace(p, "k3-loss"))},
                     "median trace of k3-loss at beta = 0.3 (base), 0.1 and 3"),
        "clip_offline": ({f"{name}, n={n}": dict(zip(("median_ratio", "share_helps"), clip_effect(offline, name, 1.0, n)))
                          for name in ("reinforce-future-is", "analytic-future-is") for n in (4, 256)},
                         "weight_clip = 1 on offline data (mu = pi_ref): median MSE(n) clipped / unclipped and share of problems where it helps"),
        "clip_binds_fresh": (max(clip_effect(_kept(("clip", 3, 3, None, s)), name, c, 16)[1] for s in (0.2, 0.4) for c in (2.0, 5.0)
                                 for name in ("reinforce-future-is", "analytic-future-is", "analytic-is")),
                             "largest share of problems where weight_clip >= 2 lowers MSE(16) of an -is estimator at s <= 0.4"),
        "offline": ({"af_is_lowest_unbiased": share(best_unbiased(p) == "analytic-future-is" for p in offline),
                     "analytic_is_wins_16": share(lowest({k: v[0] + v[1] / 16 for k, v in p["estimators"].items() if "weight_clip" not in k}) == "analytic-is" for p in offline),
                     **_q(crossover(p, "analytic-is") for p in offline)},
                    "offline (mu = pi_ref): share where analytic-future-is has the lowest trace of the unbiased estimators, share where "
                    "analytic-is has the lowest MSE(16) (unclipped estimators), and analytic-is's crossover"),
    }  # fmt: skip
    return {name: {"value": value, "what": what} for name, (value, what) in out.items()}


def value(name: str):
    return claims()[name]["value"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _g(x: float) -> str:
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def _range(q: dict) -> str:
    return f"{_g(q['median'])} [{_g(q['q10'])}, {_g(q['q90'])}]"


def findings() -> str:
    """The tabular findings of docs/variance.md, every number from ``claims``."""
    c = {name: value(name) for name in claims()}
    d_af, d_n = c["drivers"]["trace af / rf"], c["drivers"]["analytic's crossover n*"]
    rv, clip = c["rf_vs_reinforce"], c["clip_offline"]
    return "\n".join([
        f"Scope: {c['n_base']} random problems per point (`make_instance`, pi = pi*_beta); `med [q10, q90]` over them; shares of problems. "
        "`python -m studies.moments_claims` prints each number below with what it is.",
        "",
        f"- **`analytic-future` has the lowest variance of the unbiased estimators on-policy in most problems, not all:** "
        f"in {_pct(c['af_base'])} of the base problems (V = T = 3, beta = 0.3), in at least {_pct(c['af_worst_other']['share'])} at every other "
        f"fixed-beta point with T >= 2 (the lowest share at {c['af_worst_other']['point']}) except beta = 0.1, where it is {_pct(c['af_beta01'])} "
        f"(median KL(pi* || pi_ref) {_g(c['kl_beta01']['median'])} nats; {c['flagged_beta01']} of its problems are degenerate and left out).",
        f"- **Its advantage over `reinforce-future` is set by the KL to pi_ref more than by T or V.** trace ratio "
        f"af / rf: {_range(c['af_rf_base'])} at the base; at fixed beta it rises with T (median {_g(c['af_rf_T'][2])} at T = 2, "
        f"{_g(c['af_rf_T'][6])} at T = 6), but T, V and the KL move together there. Holding KL(pi* || pi_ref) fixed (beta per problem): "
        f"{_g(c['af_rf_kl']['0.25'])}, {_g(c['af_rf_kl']['1'])} and {_g(c['af_rf_kl']['2'])} at 0.25, 1 and 2 nats (T = V = 3), while over "
        f"T = 2..5 and V = 2..6 at 0.25 nats the medians stay within {_g(c['af_rf_at_kl025']['min'])}-{_g(c['af_rf_at_kl025']['max'])}. "
        f"Jointly (point medians at fixed KL): coefficient {d_af['log_kl']:+.2f} on log KL, {d_af['T']:+.2f} on T, {d_af['V']:+.2f} on V (R^2 {d_af['r2']:.2f}).",
        f"- **Returns-to-go usually lower `reinforce`'s variance, not always:** `reinforce-future` has the lower trace in "
        f"{_pct(rv['rf_lower'])} of {rv['problems']} distinct on-policy problems with T >= 2, `reinforce` in {_pct(rv['reinforce_lower'])} "
        f"(by up to {rv['largest_reversed_ratio']:.2f}x); at T = 1 they are the same estimator.",
        f"- **The direct part alone (`analytic`) trades a bias that does not average away for the smallest variance.** "
        f"|bias|^2 / |grad KL|^2 is {_range(c['analytic_bias_base'])} at the base; its crossover against the lowest-variance unbiased "
        f"estimator is {_range(c['crossover_base'])} sequences, and it has the lowest MSE(16) of all estimators in "
        f"{_pct(c['analytic_wins_16_base'])} of the base problems. At fixed KL the crossover grows with the problem's size, not the KL: "
        f"at 0.25 nats, median {_g(c['crossover_kl025']['T2'])} at T = 2 and {_g(c['crossover_kl025']['T5'])} at T = 5, "
        f"{_g(c['crossover_kl025']['V2'])} at V = 2 and {_g(c['crossover_kl025']['V6'])} at V = 6; at T = V = 3, "
        f"{_g(c['crossover_kl']['0.25'])}, {_g(c['crossover_kl']['1'])} and {_g(c['crossover_kl']['2'])} at 0.25, 1 and 2 nats "
        f"(coefficients {d_n['log_kl']:+.2f} on log KL, {d_n['T']:+.2f} on T, {d_n['V']:+.2f} on V).",
        f"- **The k2 family** (`k2-loss`, `k1+`, `k3+`, `k3-ratio`, `k3+is`) has `analytic`'s expected gradient on-policy: the same |bias|^2 "
        f"in all {rv['problems']} on-policy problems with T >= 2 (largest relative difference {c['k2_vs_analytic']['largest_relative_bias_gap']:.1g}), "
        f"at {c['k2_vs_analytic']['smallest_trace_ratio']:.1f}x `analytic`'s trace or more ({_range(c['k2_vs_analytic'])}x at the base), "
        "so its MSE is above `analytic`'s at every batch size in every one of them.",
        f"- **`k3-loss` is heavy-tailed where pi* is far from pi_ref:** median trace {c['k3_trace']['base']:.1e} at beta = 0.3, "
        f"{c['k3_trace']['beta0.1']:.1e} at beta = 0.1, {c['k3_trace']['beta3']:.2g} at beta = 3.",
        f"- **weight_clip helps small batches on very stale data and hurts large ones.** Offline (mu = pi_ref), c = 1 cuts "
        f"`reinforce-future-is`'s MSE(4) to a median {clip['reinforce-future-is, n=4']['median_ratio']:.2f}x (lower in {_pct(clip['reinforce-future-is, n=4']['share_helps'])} of problems) "
        f"but raises its MSE(256) to {clip['reinforce-future-is, n=256']['median_ratio']:.2f}x (lower in {_pct(clip['reinforce-future-is, n=256']['share_helps'])}); "
        f"`analytic-future-is`: {clip['analytic-future-is, n=4']['median_ratio']:.2f}x ({_pct(clip['analytic-future-is, n=4']['share_helps'])}) at n = 4, "
        f"{clip['analytic-future-is, n=256']['median_ratio']:.2f}x ({_pct(clip['analytic-future-is, n=256']['share_helps'])}) at n = 256. "
        f"With mu_s for s <= 0.4, c >= 2 rarely binds: it lowers an `-is` estimator's MSE(16) in at most {_pct(c['clip_binds_fresh'])} of problems.",
    ])  # fmt: skip


def recommendation() -> str:
    """The tabular half of docs/variance.md's recommendation, every number from ``claims``."""
    c = {name: value(name) for name in claims()}
    off, clip = c["offline"], c["clip_offline"]
    return "\n".join([
        f"- **Unbiased:** `analytic-future` on-policy, `analytic-future-is` off-policy (the same estimator on-policy). Lowest trace of the "
        f"unbiased estimators in {_pct(c['af_base'])} of the base problems and {_pct(off['af_is_lowest_unbiased'])} of the offline ones; "
        f"not where pi* is far from pi_ref (beta = 0.1: {_pct(c['af_beta01'])}).",
        f"- **Small batches:** the direct term alone (`analytic` / `analytic-is`) has the lowest MSE below a crossover of "
        f"{_range(c['crossover_base'])} sequences on-policy and {_range(off)} offline (per problem; it grows with T and V); it had the "
        f"lowest MSE(16) in {_pct(c['analytic_wins_16_base'])} of base and {_pct(off['analytic_is_wins_16'])} of offline problems. "
        "Its bias does not average away with more data.",
        f"- **Clip only small batches on stale data:** offline, `weight_clip` = 1 lowers `analytic-future-is`'s MSE(4) in "
        f"{_pct(clip['analytic-future-is, n=4']['share_helps'])} of problems and its MSE(256) in {_pct(clip['analytic-future-is, n=256']['share_helps'])} "
        "(weight_clip table for every `-is` estimator, c and s).",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    everything = claims()
    unknown = [name for name in argv if name not in everything]
    if unknown:
        print(f"python -m studies.moments_claims: unknown claim {unknown[0]!r}; known: {', '.join(everything)}", file=sys.stderr)
        return 2
    print(json.dumps({name: everything[name] for name in (argv or everything)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
