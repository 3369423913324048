"""The seed's four variants, analytic KL gradient on/off x analytic KL reward on/off, on one config.

Each variant is one ``python -m agents.ppo_kl`` run (same seed, same prompts; the flags below
override the config's) in
``OUT/<variant>``; a finished run (its metrics.csv has the last iteration) is reused. Prints a
Markdown table of mean task reward and mean analytic KL per third of training, and the final
held-out evaluation.

    python bench/compare_kl_variants.py [--config configs/demo.yaml] [--out runs/variants] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

from agents import metrics

VARIANTS = {
    "k1 reward (RL4LMs)": ["--kl-reward", "k1", "--no-analytic-grad"],
    "analytic reward": ["--kl-reward", "analytic", "--no-analytic-grad"],
    "k1 reward + analytic grad": ["--kl-reward", "k1", "--analytic-grad"],
    "analytic reward + analytic grad": ["--kl-reward", "analytic", "--analytic-grad"],
}


def run(config: Path, out: Path, seed: int, flags: list[str], iters: int) -> list[dict[str, str]]:
    metrics = out / "metrics.csv"
    rows = list(csv.DictReader(metrics.open())) if metrics.exists() else []
    if not rows or int(rows[-1]["iteration"]) < iters:
        command = [sys.executable, "-m", "agents.ppo_kl", "--config", str(config), "--out", str(out), "--seed", str(seed)]
        subprocess.run(command + flags + (["--resume"] if (out / "checkpoint.safetensors").exists() else []), check=True)
        rows = list(csv.DictReader(metrics.open()))
    return rows


def thirds(rows: list[dict[str, str]], key: str) -> str:
    """Means of ``key`` over the first, second and last third of the rows (fewer parts for < 3 rows)."""
    values = [float(row[key]) for row in rows if row.get(key)]
    parts = [values[len(values) * i // 3 : len(values) * (i + 1) // 3] for i in range(3)]
    return " / ".join(f"{statistics.mean(part):.3f}" for part in parts if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=45, help="must match the config's iters")
    args = parser.parse_args()
    print("| variant | task reward (thirds) | KL per sequence (thirds) | final eval sentiment | final eval perplexity |")
    print("|---|---|---|---|---|")
    for name, flags in VARIANTS.items():
        slug = name.split(" (")[0].replace(" + ", "+").replace(" ", "-")
        rows = run(args.config, args.out / slug, args.seed, flags, args.iters)
        final = [row for row in rows if row.get(metrics.EVAL_SENTIMENT)][-1]
        print(
            f"| {name} | {thirds(rows, metrics.TASK_REWARD)} | {thirds(rows, metrics.KL_ANALYTIC)} | "
            f"{float(final[metrics.EVAL_SENTIMENT]):.3f} | {float(final[metrics.EVAL_PERPLEXITY]):.1f} |"
        )


if __name__ == "__main__":
    main()
