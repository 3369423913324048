"""The steps after a run's last iteration, each idempotent and atomic, so that ``--resume`` of a run
killed after its last checkpoint completes whichever are missing or partial:

1. the final evaluation, if the last metrics.csv row (the final iteration) has none;
2. ``curves.png`` from metrics.csv (rewritten every time; cheap);
3. the export ``policy/`` with its model card, unless the run's manifest records an export at the
   current iteration and timestep counts whose every file is present and unchanged
   (``agents.ownership.export_is_current``; the old folder stays until the new one is complete).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.metrics import EVAL_SENTIMENT
from agents.cli.config import Args, command_line
from agents.cli.evaluation import evaluate
from agents.cli.model_card import model_card
from agents.cli.ownership import export_is_current
from agents.cli.plots import plot_curves
from agents.cli.run_dir import CURVES, METRICS, POLICY, export_policy, read_rows, write_rows
from agents.vec_env import LMGymVecEnv


def finish(model: Any, args: Args, out: Path, tokenizer: Any, eval_env: LMGymVecEnv | None) -> None:
    """Complete the finish steps of the run in ``out`` whose final state ``model`` holds."""
    rows: list[dict[str, Any]] = list(read_rows(out / METRICS))
    final = rows[-1] if rows else None
    if final is not None and eval_env is not None and args.eval_every and not final.get(EVAL_SENTIMENT):
        if int(final["iteration"]) == model.n_iterations:
            print("finish: final evaluation", flush=True)
            rows[-1] = {**final, **evaluate(model.policy, eval_env, model.reference, sampler=model.sampler).metrics()}
            write_rows(out / METRICS, rows)
    plot_curves(rows, out / CURVES, title=out.name)
    if not export_is_current(out, model.n_iterations, model.num_timesteps):
        print(f"finish: exporting the policy to {out / POLICY}", flush=True)
        card = model_card(args, rows, model.n_iterations, model.num_timesteps, command_line(args))
        export_policy(model, tokenizer, out, card)

