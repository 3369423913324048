"""The LM study's table and Pareto plots, regenerated from the per-run result files.

Each cell (variant, beta) aggregates the runs of every seed finished so far: the mean of each
run's held-out metric and its standard error across seeds, s / sqrt(n) with the n - 1 sample
standard deviation. The table states n per cell. With a single seed there is no such error: the
table and plots then show the run's standard error over the held-out prompts (sentiment and KL),
which measures the evaluation noise only, not the training noise across seeds.

A second table pairs each variant with the baseline variant (k1) at the same beta and seed: runs of
one seed draw the same rollout prompts at every iteration and are evaluated on the same prompts
with the same sampling seed, so the per-seed difference removes what the two runs share.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.cli_checks import read_json

RUN_RESULTS = "per_run"  # not "runs": .gitignore ignores every runs/ folder (checkpoints)
TABLE = "table.md"
PARETO_KL = "pareto_kl.png"
PARETO_PPL = "pareto_ppl.png"

METRICS: dict[str, tuple[str, str]] = {  # key -> (column title, format)
    "sentiment": ("held-out sentiment", "+.3f"),
    "kl": ("KL per sequence (nats)", ".3f"),
    "objective": ("sentiment - beta KL", "+.3f"),
    "perplexity": ("perplexity under pi_ref", ".1f"),
    "distinct_2": ("distinct-2", ".3f"),
    "train_reward": ("train reward (last 5 it.)", "+.3f"),
    "train_kl": ("train KL (last 5 it.)", ".3f"),
}


def run_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """The scalars of one result file that the report aggregates. ``objective`` is the held-out
    value of what every variant at that beta maximises, E[r] - beta KL(pi || pi_ref) per sequence
    (None for the reference policy, which has no beta)."""
    evaluation, train = record["eval"], record.get("train", {})
    sentiment, kl, beta = evaluation["sentiment"]["mean"], evaluation["kl"]["mean"], record.get("beta")
    return {
        "sentiment": sentiment,
        "kl": kl,
        "objective": None if beta is None else sentiment - float(beta) * kl,
        "perplexity": evaluation["perplexity"],
        "distinct_2": evaluation["distinct_2"],
        "train_reward": train.get("task_reward_last5"),
        "train_kl": train.get("kl_last5"),
    }


def prompt_sems(record: Mapping[str, Any]) -> dict[str, float]:
    """Standard errors over the held-out prompts of one run's sentiment and KL."""
    return {key: record["eval"][key]["sem"] for key in ("sentiment", "kl") if "sem" in record["eval"][key]}


@dataclass
class Cell:
    variant: str
    beta: float
    seeds: list[int]
    mean: dict[str, float]
    sem: dict[str, float | None]  # None with a single seed
    prompt_sem: dict[str, float]  # mean over runs of the per-run standard error over prompts

    def error(self, key: str) -> float:
        """The error bar of ``key``: across seeds, or over prompts for a single seed (0 if none)."""
        sem = self.sem.get(key)
        return sem if sem is not None else self.prompt_sem.get(key, 0.0)


def reference_cell(reference: Mapping[str, Any]) -> Cell:
    """The untrained policy's evaluation as a cell of its own (no seeds, no beta)."""
    mean = {key: value for key, value in run_metrics(reference).items() if value is not None}
    return Cell("reference", math.nan, [], mean, {key: None for key in METRICS}, prompt_sems(reference))


def mean_sem(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def aggregate(records: list[Mapping[str, Any]], order: list[str]) -> list[Cell]:
    """One cell per (variant, beta), in ``order`` of variants then increasing beta."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["variant"], float(record["beta"])), []).append(record)
    rank = {name: i for i, name in enumerate(order)}
    cells = []
    for (variant, beta), group in sorted(groups.items(), key=lambda item: (rank.get(item[0][0], len(rank)), item[0])):
        metrics = [run_metrics(record) for record in group]
        mean, sem = {}, {}
        for key in METRICS:
            values = [m[key] for m in metrics if m[key] is not None]
            if values:
                mean[key], sem[key] = mean_sem(values)
        sems = [prompt_sems(record) for record in group]
        prompt_sem = {key: sum(s[key] for s in sems) / len(sems) for key in sems[0] if all(key in s for s in sems)}
        cells.append(Cell(variant, beta, sorted(int(r["seed"]) for r in group), mean, sem, prompt_sem))
    return cells


def _fmt(cell: Cell, key: str) -> str:
    if key not in cell.mean:
        return "-"
    spec = METRICS[key][1]
    sem, unsigned = cell.sem[key], spec.lstrip("+")
    if sem is not None:
        return format(cell.mean[key], spec) + " ± " + format(sem, unsigned)
    if key in cell.prompt_sem:
        return format(cell.mean[key], spec) + " (± " + format(cell.prompt_sem[key], unsigned) + " prompts)"
    return format(cell.mean[key], spec)


def table(cells: list[Cell], labels: Mapping[str, str], reference: Mapping[str, Any] | None) -> str:
    """A Markdown table: mean ± standard error across seeds, with n seeds per cell (for n = 1, the
    standard error over prompts in parentheses)."""
    head = ["variant", "beta", "n seeds"] + [title for title, _ in METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if reference is not None:
        ref = reference_cell(reference)
        lines.append("| reference (untrained) | - | - | " + " | ".join(_fmt(ref, key) for key in METRICS) + " |")
    for cell in cells:
        row = [labels.get(cell.variant, cell.variant), f"{cell.beta:g}", str(len(cell.seeds))]
        lines.append("| " + " | ".join(row + [_fmt(cell, key) for key in METRICS]) + " |")
    return "\n".join(lines) + "\n"


PAIRED: tuple[str, ...] = ("objective", "sentiment", "kl")


def paired_table(records: list[Mapping[str, Any]], labels: Mapping[str, str], order: list[str], baseline: str) -> str:
    """Mean ± standard error across seeds of (variant - baseline) at the same beta and seed, for
    every variant and beta with at least one seed where both finished."""
    by_key = {(r["variant"], float(r["beta"]), int(r["seed"])): run_metrics(r) for r in records}
    head = ["variant", "beta", "n pairs"] + [f"Δ {METRICS[key][0]}" for key in PAIRED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = {name: i for i, name in enumerate(order)}
    cells = sorted({(v, b) for v, b, _ in by_key if v != baseline}, key=lambda vb: (rank.get(vb[0], len(rank)), vb[1]))
    for variant, beta in cells:
        seeds = sorted(s for v, b, s in by_key if (v, b) == (variant, beta) and (baseline, beta, s) in by_key)
        if not seeds:
            continue
        row = [labels.get(variant, variant), f"{beta:g}", str(len(seeds))]
        for key in PAIRED:
            mean, sem = mean_sem([by_key[variant, beta, s][key] - by_key[baseline, beta, s][key] for s in seeds])
            unsigned = METRICS[key][1].lstrip("+")
            row.append(f"{mean:+{unsigned}}" + ("" if sem is None else f" ± {sem:{unsigned}}"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compute_summary(records: list[Mapping[str, Any]]) -> str:
    """One paragraph: runs, summed training and evaluation wall time, machines, code versions."""
    if not records:
        return "No runs yet.\n"
    train_hours = sum(float(r.get("train", {}).get("wall_seconds") or 0.0) for r in records) / 3600
    eval_minutes = sum(float(r["eval"].get("seconds") or 0.0) for r in records) / 60

    def machine(record: Mapping[str, Any]) -> str:
        m = record.get("machine", {})
        return f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, OMP_NUM_THREADS={m.get('omp_num_threads')})"

    def commit(record: Mapping[str, Any]) -> str:
        return str(record.get("git_commit", ""))[:7] + (" (dirty)" if record.get("git_dirty") else "")

    def counted(key: Callable[[Mapping[str, Any]], str]) -> str:
        counts = Counter(map(key, records))  # in order of first appearance
        return ", ".join(f"{name}: {n} run{'s' * (n != 1)}" for name, n in counts.items())

    return (
        f"{len(records)} runs; training wall time {train_hours:.1f} h summed over runs, held-out evaluation "
        f"{eval_minutes:.0f} min. Machines: {counted(machine)}. Code: {counted(commit)}.\n"
    )


def plot_pareto(cells: list[Cell], labels: Mapping[str, str], reference: Mapping[str, Any] | None, x_key: str, path: Path) -> None:
    """Held-out sentiment against ``x_key``, one line per variant through its betas, error bars
    of one standard error on both axes (``Cell.error``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*X"
    variants = list(dict.fromkeys(cell.variant for cell in cells))
    for i, variant in enumerate(variants):
        own = [cell for cell in cells if cell.variant == variant]
        xs = [cell.mean[x_key] for cell in own]
        ys = [cell.mean["sentiment"] for cell in own]
        xerr = [cell.error(x_key) for cell in own]
        yerr = [cell.error("sentiment") for cell in own]
        seeds = "/".join(sorted({str(len(cell.seeds)) for cell in own}))
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=markers[i % len(markers)], capsize=3,
                    label=f"{labels.get(variant, variant)} (n={seeds})")  # fmt: skip
        for cell, x, y in zip(own, xs, ys):
            ax.annotate(f"β={cell.beta:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference is not None:
        ref = reference_cell(reference)
        ax.errorbar([ref.mean[x_key]], [ref.mean["sentiment"]], yerr=[ref.error("sentiment")], marker="*", markersize=14,
                    color="black", linestyle="none", capsize=3, label="reference (untrained)")  # fmt: skip
    ax.set_xlabel(METRICS[x_key][0])
    ax.set_ylabel(METRICS["sentiment"][0])
    ax.set_title(f"held-out sentiment vs {METRICS[x_key][0]}: mean ± s.e. across n seeds\n(n=1: s.e. over the held-out prompts)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_records(results: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    records = [read_json(path) for path in sorted((results / RUN_RESULTS).glob("*.json"))]
    reference_path = results / "reference.json"
    reference = read_json(reference_path) if os.path.lexists(reference_path) else None
    return records, reference


def write_report(results: Path, variants: Mapping[str, Any]) -> list[Cell]:
    """Regenerate ``table.md``, ``pareto_kl.png`` and ``pareto_ppl.png`` in ``results``."""
    records, reference = load_records(results)
    labels = {name: variant.label for name, variant in variants.items()}
    cells = aggregate(records, list(variants))
    results.mkdir(parents=True, exist_ok=True)
    baseline = next(iter(variants))
    paired = f"Paired against {labels.get(baseline, baseline)} at the same beta and seed (variant - baseline):\n\n"
    paired += paired_table(records, labels, list(variants), baseline)
    (results / TABLE).write_text("\n".join([table(cells, labels, reference), paired, compute_summary(records)]))
    for x_key, name in (("kl", PARETO_KL), ("perplexity", PARETO_PPL)):
        plot_pareto(cells, labels, reference, x_key, results / name)
    return cells
