"""The tabular study's report, regenerated from its per-cell JSON files alone.

Writes into the results folder: ``exact.csv`` (one row per instance and configuration),
``sampled.csv`` (one row per instance and configuration, mean and standard error over seeds),
``table.md`` and the plots ``exact_fixed_points.png``, ``exact_trajectories.png`` and
``sampled_<instance>.png``.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, median, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import kl_estimators  # noqa: E402
from studies.cli_checks import read_json  # noqa: E402
from studies.tabular_configs import all_configs  # noqa: E402
from studies.tabular_model import make_instance  # noqa: E402

REACHED = 1e-6  # KL(pi || pi*) below which a run counts as having reached pi*
REPRESENTATIVE = "V3-T3-b1-s0"  # the instance of the detail table, the trajectory plot and the sampled part
PLOTTED = (  # one configuration per kind of behaviour, for the curve plots (the tables have all)
    "loss:reinforce-future", "loss:analytic-future", "loss:analytic", "loss:k3-loss", "loss:k1-loss",
    "loss:abs-loss", "reward:analytic", "reward:k2+grad", "reward:k3", "ppo:analytic+grad",
    "off:analytic-future-is", "offline:analytic-future", "offline:analytic-future-is",
)
EXACT_COLUMNS = ("instance", "vocab", "length", "beta", "config", "family", "kl_to_opt", "reward", "kl_to_ref",
                 "objective", "grad_at_opt", "converged", "steps", "seconds")
SAMPLED_COLUMNS = ("instance", "config", "family", "seeds", "steps", "samples", "quarter_step", "kl_to_opt_quarter_mean",
                   "kl_to_opt_quarter_se", "kl_to_opt_mean", "kl_to_opt_se",
                   "reward_mean", "kl_to_ref_mean", "seconds")


def _load(folder: Path) -> list[dict]:
    return [read_json(p) for p in sorted(folder.rglob("*.json"))] if folder.exists() else []


def _config_order(cells: list[dict]) -> list[str]:
    """The configurations present in ``cells``, in the order of ``all_configs`` (unknown ones last)."""
    known = [c.name for c in all_configs()]
    present = {c["config"] for c in cells}
    return [n for n in known if n in present] + sorted(present - set(known))


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "diverged"
    return f"{x:.1e}" if abs(x) < 1e-2 and x != 0 else f"{x:.3g}"


def _mean_se(m: float, se: float) -> str:
    return _fmt(m) if not math.isfinite(m) or not math.isfinite(se) else f"{_fmt(m)} ± {_fmt(se)}"


def _sem(xs: list[float]) -> float:
    """Standard error of the mean; NaN for fewer than two values or any non-finite one (a diverged run)."""
    if len(xs) < 2 or not all(math.isfinite(x) for x in xs):
        return math.nan
    return stdev(xs) / math.sqrt(len(xs))


def _claim(cell: dict) -> str:
    """What ``ESTIMATOR_INFO`` claims for a loss/off/offline configuration: unbiased at every T or not."""
    info = kl_estimators.ESTIMATOR_INFO.get(cell["config"].split(":", 1)[1])
    if cell["family"] not in ("loss", "off", "offline") or info is None:
        return "-"
    unbiased = info.unbiased_on_policy if cell["family"] == "loss" else info.unbiased_off_policy
    return "unbiased" if unbiased else "biased"


def _reached(rows: list[dict]) -> int:
    return sum(math.isfinite(r["kl_to_opt"]) and r["kl_to_opt"] < REACHED for r in rows)


def _worst(values: list[float]) -> float:
    return max((v if math.isfinite(v) else math.inf) for v in values)


def _exact_summary(cells: list[dict]) -> list[str]:
    """Per configuration: how many instances reach pi* (T = 1, T > 1), and how far the rest end."""
    by_config = defaultdict(list)
    for c in cells:
        by_config[c["config"]].append(c)
    lines = [
        "| configuration | ESTIMATOR_INFO says | reaches pi*, T = 1 | reaches pi*, T > 1 | median KL(pi‖pi*), T > 1 "
        "| worst KL(pi‖pi*), T > 1 | max \\|E grad\\| at pi*, T > 1 | fixed point found, T > 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in _config_order(cells):
        short = [c for c in by_config[name] if c["length"] == 1]
        long = [c for c in by_config[name] if c["length"] > 1]
        kls = [c["kl_to_opt"] if math.isfinite(c["kl_to_opt"]) else math.inf for c in long]
        lines.append(
            f"| `{name}` | {_claim(by_config[name][0])} | {_reached(short)}/{len(short)} | {_reached(long)}/{len(long)} | "
            f"{_fmt(median(kls)) if kls else '-'} | {_fmt(max(kls)) if kls else '-'} | "
            f"{_fmt(_worst([c['grad_at_opt'] for c in long])) if long else '-'} | "
            f"{sum(c['converged'] for c in long)}/{len(long)} |"
        )
    return lines


def _exact_detail(cells: list[dict], instance: str) -> list[str]:
    rows = [c for c in cells if c["instance"] == instance]
    if not rows:
        return []
    lines = [
        f"Exact dynamics on instance `{instance}` (V = {rows[0]['vocab']}, T = {rows[0]['length']}, "
        f"beta = {rows[0]['beta']:g}): the end point of each configuration.",
        "",
        "| configuration | KL(pi‖pi*) | E_pi[r] | KL(pi‖pi_ref) | J | \\|E grad\\| at pi* | steps | fixed point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = rows[0]
    optimum = make_instance(first["vocab"], first["length"], first["beta"], first["instance_seed"])
    best = optimum.metrics(optimum.optimum_table())
    lines.append(
        f"| pi* (enumerated) | 0 | {_fmt(best['reward'])} | {_fmt(best['kl_to_ref'])} | {_fmt(best['objective'])} | - | - | - |"
    )
    order = {n: i for i, n in enumerate(_config_order(cells))}
    for c in sorted(rows, key=lambda c: order[c["config"]]):
        lines.append(
            f"| `{c['config']}` | {_fmt(c['kl_to_opt'])} | {_fmt(c['reward'])} | {_fmt(c['kl_to_ref'])} | "
            f"{_fmt(c['objective'])} | {_fmt(c['grad_at_opt'])} | {c['steps']} | {'yes' if c['converged'] else 'no'} |"
        )
    return lines


def _sampled_rows(cells: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for c in cells:
        groups[(c["instance"], c["config"])].append(c)
    rows = []
    for (instance, config), runs in sorted(groups.items()):
        finals = [r["kl_to_opt"] for r in runs]
        quarter = [r["trajectory"][len(r["trajectory"]) // 4]["kl_to_opt"] for r in runs]
        rows.append({
            "instance": instance,
            "config": config,
            "family": runs[0]["family"],
            "seeds": len(runs),
            "steps": runs[0]["trajectory"][-1]["step"],
            "samples": runs[0]["trajectory"][-1]["samples"],
            "quarter_step": runs[0]["trajectory"][len(runs[0]["trajectory"]) // 4]["step"],
            "kl_to_opt_quarter_mean": mean(quarter),
            "kl_to_opt_quarter_se": _sem(quarter),
            "kl_to_opt_mean": mean(finals),
            "kl_to_opt_se": _sem(finals),
            "reward_mean": mean(r["reward"] for r in runs),
            "kl_to_ref_mean": mean(r["kl_to_ref"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs),
        })
    return rows


def _sampled_table(rows: list[dict], exact: list[dict]) -> list[str]:
    lines = []
    exact_kl = {(c["instance"], c["config"]): c["kl_to_opt"] for c in exact}
    for instance in sorted({r["instance"] for r in rows}):
        mine = [r for r in rows if r["instance"] == instance]
        lines += [
            "",
            f"Sampled dynamics on `{instance}`: {mine[0]['steps']} SGD steps of {mine[0]['samples'] // mine[0]['steps']} "
            f"sequences (one batch per K steps for the K-step families), KL(pi‖pi*) at step {mine[0]['quarter_step']} "
            f"and at the end, mean ± s.e. over {mine[0]['seeds']} seeds; the exact-gradient end point for comparison.",
            "",
            f"| configuration | samples drawn | KL(pi‖pi*) at step {mine[0]['quarter_step']} | KL(pi‖pi*) at the end "
            "| E_pi[r] | KL(pi‖pi_ref) | exact-gradient KL(pi‖pi*) |",
            "|---|---|---|---|---|---|---|",
        ]
        order = {n: i for i, n in enumerate(_config_order(mine))}
        for r in sorted(mine, key=lambda r: order[r["config"]]):
            ex = exact_kl.get((instance, r["config"]))
            lines.append(
                f"| `{r['config']}` | {r['samples']} | {_mean_se(r['kl_to_opt_quarter_mean'], r['kl_to_opt_quarter_se'])} | "
                f"{_mean_se(r['kl_to_opt_mean'], r['kl_to_opt_se'])} | "
                f"{_fmt(r['reward_mean'])} | {_fmt(r['kl_to_ref_mean'])} | {'-' if ex is None else _fmt(ex)} |"
            )
    return lines


def _plot_fixed_points(cells: list[dict], path: Path) -> None:
    names = _config_order(cells)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    colours = {1: "tab:grey", 2: "tab:blue", 3: "tab:orange", 4: "tab:red"}
    for i, name in enumerate(names):
        for c in cells:
            if c["config"] == name:
                kl = c["kl_to_opt"] if math.isfinite(c["kl_to_opt"]) else 1e3
                ax.scatter(max(kl, 1e-16), i + 0.08 * (c["length"] - 2.5), s=9, color=colours[c["length"]])
    for length, colour in colours.items():
        ax.scatter([], [], color=colour, s=9, label=f"T = {length}")
    ax.axvline(REACHED, color="k", lw=0.6, ls="--")
    ax.set(xscale="log", yticks=range(len(names)), yticklabels=names, xlabel="KL(pi ‖ pi*) at the end (exact gradients; diverged runs drawn at 1e3)")
    ax.invert_yaxis()
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("Exact expected-gradient dynamics: end points over all instances", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(groups: dict[str, list[list[dict]]], path: Path, title: str, xscale: str) -> None:
    """KL(pi‖pi*) vs ``x`` per configuration: mean ± s.e. band over the runs of each group."""
    fig, ax = plt.subplots(figsize=(9, 5))
    cmap = plt.get_cmap("tab10")
    for i, (name, runs) in enumerate(groups.items()):
        steps = [p["step"] for p in runs[0]]
        values = [[min(run[j]["kl_to_opt"], 1e3) for run in runs] for j in range(len(steps))]
        centre = [mean(v) for v in values]
        ax.plot(steps, centre, label=name, color=cmap(i % 10), ls="-" if i < 10 else "--", lw=1.2)
        if len(runs) > 1:
            se = [_sem(v) for v in values]
            ax.fill_between(steps, [max(c - s, 1e-16) for c, s in zip(centre, se)], [c + s for c, s in zip(centre, se)],
                            color=cmap(i % 10), alpha=0.2)
    ax.set(xscale=xscale, yscale="log", xlabel="gradient step", ylabel="KL(pi ‖ pi*)", title=title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> None:
    """Regenerate the CSVs, table.md and the plots under ``out`` from its JSON result files."""
    exact, sampled = _load(out / "exact"), _load(out / "sampled")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "exact.csv", EXACT_COLUMNS, exact)
    sampled_rows = _sampled_rows(sampled)
    _write_csv(out / "sampled.csv", SAMPLED_COLUMNS, sampled_rows)
    machines = sorted({c.get("machine", "?") for c in exact + sampled})
    lines = [
        "# Tabular study (generated by `python -m studies.tabular --report`)",
        "",
        f"Compute: {sum(c['seconds'] for c in exact):.0f} s (exact, {len(exact)} runs) + "
        f"{sum(c['seconds'] for c in sampled):.0f} s (sampled, {len(sampled)} runs) of one CPU thread "
        f"on {', '.join(machines)}.",
        "",
        f"A run reaches pi* when KL(pi‖pi*) < {REACHED:g} at its end point.",
        "",
        *_exact_summary(exact),
        "",
        *_exact_detail(exact, REPRESENTATIVE),
        *_sampled_table(sampled_rows, exact),
    ]
    tmp = out / f"table.md.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "table.md")
    if exact:
        _plot_fixed_points(exact, out / "exact_fixed_points.png")
        detail = {c["config"]: [c["trajectory"]] for c in exact if c["instance"] == REPRESENTATIVE}
        if detail:
            detail = {n: detail[n] for n in PLOTTED if n in detail}
            _plot_curves(detail, out / "exact_trajectories.png", f"Exact dynamics on {REPRESENTATIVE}", "log")
    for instance in sorted({c["instance"] for c in sampled}):
        runs = defaultdict(list)
        for c in sampled:
            if c["instance"] == instance:
                runs[c["config"]].append(c["trajectory"])
        _plot_curves({n: runs[n] for n in PLOTTED if n in runs}, out / f"sampled_{instance}.png",
                     f"Sampled dynamics on {instance}: mean ± s.e. over seeds", "linear")
