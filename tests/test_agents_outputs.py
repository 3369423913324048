"""What a finished CLI run leaves and prints: no .lock, a finished-run message on --resume, curves
without empty panels or fractional iteration ticks, a model card with a real title and rounded
metrics (a tiny local model, in-process)."""

from __future__ import annotations

import re

import pytest

from agents.cli.plots import PANELS, panels
from agents.ppo_kl import main
from tests.helpers.cli import run_main, tiny_run_flags


@pytest.fixture(scope="module")
def quiet_run(tiny_lm_path, tmp_path_factory):
    """A finished 2-iteration run without evaluation (--eval-every 0)."""
    out = tmp_path_factory.mktemp("outputs") / "quiet"
    flags = tiny_run_flags(tiny_lm_path, out, 2)
    flags[flags.index("--eval-every") + 1] = "0"
    assert main(flags) == 0
    return out, flags


def test_a_clean_exit_leaves_no_lock(quiet_run):
    out, _ = quiet_run
    assert not (out / ".lock").exists()
    assert (out / "policy" / "README.md").is_file()


def test_resume_of_a_finished_run_says_so(quiet_run, capsys):
    out, flags = quiet_run
    code, err = run_main([*flags, "--resume"], capsys)
    assert code == 0 and "has already finished its 2 iterations" in err, err
    assert not (out / ".lock").exists()


def test_curves_have_no_empty_panels_without_evaluation(quiet_run):
    import csv

    out, _ = quiet_run
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    titles = [label for _, label, _ in panels(rows)]
    assert titles and not any(t.startswith("eval") for t in titles)
    assert len(titles) < len(PANELS)
    assert (out / "curves.png").stat().st_size > 0


def test_plot_uses_integer_iteration_ticks(tmp_path):
    import matplotlib.pyplot as plt

    from agents.cli import plots

    rows = [{"iteration": 1, "rollout/task_reward": 0.1}, {"iteration": 2, "rollout/task_reward": 0.3}]
    created = []
    original = plt.subplots
    plots.plt.subplots = lambda *a, **k: created.append(original(*a, **k)) or created[-1]
    try:
        plots.plot_curves(rows, tmp_path / "c.png", title="demo")
    finally:
        plots.plt.subplots = original
    fig, axes = created[0]
    assert len(fig.axes) == 1  # one metric with data: one panel
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks() if 1 <= t <= 2)
    assert fig._suptitle.get_text() == "demo"


def test_the_model_card_has_a_real_title_and_rounded_metrics(quiet_run, tiny_lm_path):
    out, _ = quiet_run
    card = (out / "policy" / "README.md").read_text()
    title = re.search(r"(?m)^# (.+)$", card)[1]
    assert "/" not in title and "fine-tuned with PPO" in title, title
    values = re.findall(r"\| `(?:rollout|train)/[\w/]+` \| (-?[\d.e+-]+) \|", card)
    assert values and all(len(v.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) <= 4 for v in values), values
    assert not re.search(r"\| `rollout/kl_analytic` \| -", card)
