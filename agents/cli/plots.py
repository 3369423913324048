"""Training curves from metrics.csv as one PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.ticker import MaxNLocator  # noqa: E402

from agents.metrics import EVAL_DISTINCT_2, EVAL_PERPLEXITY, EVAL_SENTIMENT, KL_ANALYTIC, KL_COEF, TASK_REWARD
from agents.cli.formatting import shown  # noqa: E402
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


def panels(rows: list[dict[str, object]]) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """The panels that have data: (metrics.csv column, title, (iteration, value) points) per ``PANELS``
    entry with at least one value; an exact KL is clamped at 0 (``agents.formatting.shown``)."""
    found = []
    for key, label in PANELS:
        points = [(int(row["iteration"]), shown(key, float(row[key]))) for row in rows if row.get(key) not in (None, "")]
        if points:
            found.append((key, label, points))
    return found


def plot_curves(rows: list[dict[str, object]], path: Path, title: str = "") -> None:
    """One panel per metric with data against the iteration (integer ticks); metrics without any
    value (the eval panels with ``--eval-every 0``) get no panel. Written atomically."""
    shown_panels = panels(rows) or [(PANELS[0][0], PANELS[0][1], [])]
    columns = min(3, len(shown_panels))
    rows_of_panels = -(-len(shown_panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.4 * columns, 3.3 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(shown_panels):]:
        ax.remove()
    for ax, (_, label, points) in zip(axes.flat, shown_panels):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, alpha=0.5 if len(points) > 10 else 1)
            if len(points) > 10:
                ax.plot(xs, moving_average(ys, SMOOTHING), color="C3", label=f"mean of last {SMOOTHING}")
                ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
