"""Training curves from metrics.csv as one PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agents.metrics import EVAL_DISTINCT_2, EVAL_PERPLEXITY, EVAL_SENTIMENT, KL_ANALYTIC, KL_COEF, TASK_REWARD
from agents.cli.run_dir import atomic_write  # noqa: E402

PANELS = (
    (TASK_REWARD, "task reward (sentiment)"),
    (KL_ANALYTIC, "KL(pi || pi_ref) per sequence"),
    (KL_COEF, "beta"),
    (EVAL_SENTIMENT, "eval sentiment"),
    (EVAL_PERPLEXITY, "eval perplexity under pi_ref"),
    (EVAL_DISTINCT_2, "eval distinct-2"),
)


SMOOTHING = 5


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_curves(rows: list[dict[str, object]], path: Path, title: str = "") -> None:
    """One panel per metric against the iteration; missing values are skipped. Written atomically."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, label) in zip(axes.flat, PANELS):
        points = [(int(row["iteration"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, alpha=0.5 if len(points) > 10 else 1)
            if len(points) > 10:
                ax.plot(xs, moving_average(ys, SMOOTHING), color="C3", label=f"mean of last {SMOOTHING}")
                ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
