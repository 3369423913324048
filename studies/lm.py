"""``python -m studies.lm``: the LM study, KL variants x KL strengths x seeds on the embedded model.

    python -m studies.lm --config configs/study_lm.yaml --seeds 0,1,2 --betas 0.1,0.03,0.3
    python -m studies.lm --report          # only regenerate results/lm/table.md and the plots

Each run is one ``python -m agents.ppo_kl`` subprocess (the base config, then the variant's KL
flags, ``--kl-coef BETA`` and ``--seed SEED``) training in ``STUDY_DIR/<run id>``, followed by a
held-out evaluation of its final policy (``studies.lm_eval``) written as a small JSON file to
``RESULTS/per_run/<run id>.json``. Runs are ordered seed-major, so a complete set of variants x betas
for the first seed is reached first, and within a seed beta-major (all variants at the first
beta given, then at the next). The study is resumable: a run whose result file exists is
skipped, a run with a checkpoint is continued with ``--resume``, and a run killed before its first
checkpoint is started again. The final policy is evaluated from the run's Hugging Face export
(``policy/``); it and the checkpoint (1.6 GB for SmolLM2-135M with the Adam state) are deleted
once the result is written, unless ``--keep-checkpoints``. The untrained reference policy
is evaluated once (``RESULTS/reference.json``, KL = 0). After every run the table and plots are
regenerated from whatever results exist (``studies.lm_report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.metrics import ITERATION_SECONDS, KL_ANALYTIC, TASK_REWARD
from agents.cli.config import Args, parse_args
from agents.cli.ownership import claim
from agents.cli.run_dir import CHECKPOINT, METRICS, POLICY, atomic_write, check_unlocked, lock_run_dir, read_rows
from lmgym.assets import load_causal_lm
from lmgym.prompts import HELD_OUT, load_prompts
from lmgym.task import ContinuationTask
from studies.lm_eval import HeldOutScores, evaluate_held_out
from studies.lm_grid import DEFAULT_VARIANTS, VARIANTS
from studies.lm_report import RUN_RESULTS, write_report

REPO = Path(__file__).resolve().parents[1]


VARIANT_KEYS = ("kl_reward", "analytic_grad", "kl_loss", "kl_coef", "seed", "out", "resume", "mask_top_k", "mask_top_p", "mask_sync_every")
TRAIN_LOG = "train.log"
WALL_SECONDS = "wall_seconds.txt"
N_SAMPLES = 3  # continuations kept in each result file
LAST_ITERATIONS = 5  # training metrics are averaged over the last few iterations


@dataclass(frozen=True)
class Run:
    variant: str
    beta: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"s{self.seed}-{self.variant}-b{self.beta:g}"


def grid(variants: list[str], betas: list[float], seeds: list[int]) -> list[Run]:
    """Seed-major order (every beta x variant of the first seed, then of the next one), and within
    a seed beta-major in the order given, so that all variants at the first beta finish first."""
    return [Run(variant, beta, seed) for seed in seeds for beta in betas for variant in variants]


def _list(kind: type, name: str):
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated {kind.__name__} values, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return values

    return parse


def _variants(text: str) -> list[str]:
    names = _list(str, "--variants")(text)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studies.lm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=Path("configs/study_lm.yaml"), help="base YAML config of every run")
    parser.add_argument("--variants", type=_variants, default=DEFAULT_VARIANTS, help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--betas", type=_list(float, "--betas"), default=[0.1, 0.03, 0.3], help="KL coefficients, in the order run")
    parser.add_argument("--seeds", type=_list(int, "--seeds"), default=[0, 1, 2], help="training seeds")
    parser.add_argument("--iters", type=int, help="PPO iterations per run (None: the config's)")
    parser.add_argument("--study-dir", type=Path, default=Path("runs/study_lm"), help="training output of each run")
    parser.add_argument("--results", type=Path, default=Path("results/lm"), help="per-run JSON, table and plots")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts per evaluation, the first ones of the heldout split (None: all 170)")
    parser.add_argument("--eval-seed", type=int, default=12345, help="sampling seed of every evaluation")
    parser.add_argument("--eval-batch", type=int, default=64, help="prompts per evaluation batch")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoint and exported policy")
    parser.add_argument("--report", action="store_true", help="only regenerate the table and plots")
    return parser


def run_args(config: Path, run: Run, iters: int | None, out: Path, resume: bool) -> list[str]:
    """The ``agents.ppo_kl`` flags of one run."""
    flags = ["--config", str(config), *VARIANTS[run.variant].flags, "--kl-coef", str(run.beta), "--seed", str(run.seed)]
    flags += ["--out", str(out)] + (["--iters", str(iters)] if iters is not None else []) + (["--resume"] if resume else [])
    return flags


def check_config(config: Path) -> Args:
    """The base config parsed like the CLI does; it must leave the study's own keys alone."""
    import yaml

    if not config.is_file():
        raise ValueError(f"--config: no such file {config}")
    data = yaml.safe_load(config.read_text()) or {}
    clashing = sorted(key for key in map(lambda k: str(k).replace("-", "_"), data) if key in VARIANT_KEYS)
    if clashing:
        raise ValueError(f"--config: {config} sets {clashing}, which the study sets per run; remove them")
    return parse_args(["--config", str(config)])


def train(config: Path, run: Run, iters: int | None, out: Path) -> bool:
    """Train (or continue) one run in ``out``; False if the subprocess failed (its log is kept)."""
    resume = (out / CHECKPOINT).is_file()
    if not resume and out.exists():
        check_unlocked(out)  # RunDirError if a run is training there now
        shutil.rmtree(out)  # killed before its first checkpoint: nothing to continue from
    out.mkdir(parents=True, exist_ok=True)
    claim(out)  # the run's manifest first: the log below is the study's, in the run's folder
    command = [sys.executable, "-m", "agents.ppo_kl", *run_args(config, run, iters, out, resume)]
    start = time.perf_counter()
    with (out / TRAIN_LOG).open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = out / WALL_SECONDS
    previous = float(wall.read_text()) if wall.is_file() else 0.0
    wall.write_text(f"{previous + time.perf_counter() - start:.1f}\n")
    return done.returncode == 0


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, standard error, standard deviation and range of per-prompt values."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {
        "mean": float(values.mean()),
        "sem": std / float(np.sqrt(values.size)),
        "std": std,
        "min": float(values.min()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def eval_metrics(scores: HeldOutScores, seed: int) -> dict[str, Any]:
    return {
        "n_prompts": len(scores.prompts),
        "seed": seed,
        "sentiment": summary(scores.sentiment),
        "kl": summary(scores.kl),
        "perplexity": scores.perplexity,
        "nll_per_token": summary(scores.nll / np.maximum(scores.n_tokens, 1)),
        "gen_length": summary(scores.n_tokens),
        "distinct_1": scores.distinct(1),
        "distinct_2": scores.distinct(2),
        "samples": [{"prompt": p, "continuation": c} for p, c in list(zip(scores.prompts, scores.continuations))[:N_SAMPLES]],
    }


def train_metrics(out: Path) -> dict[str, Any]:
    """Iterations done, summed iteration seconds, and rollout reward/KL over the last iterations."""
    rows = [row for row in read_rows(out / METRICS) if row.get(TASK_REWARD)]
    last = rows[-LAST_ITERATIONS:]

    def mean(key: str) -> float:
        return float(np.mean([float(row[key]) for row in last]))

    wall = out / WALL_SECONDS
    return {
        "iterations": int(rows[-1]["iteration"]) if rows else 0,
        "iteration_seconds": float(sum(float(row.get(ITERATION_SECONDS) or 0) for row in rows)),
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        f"task_reward_last{LAST_ITERATIONS}": mean(TASK_REWARD) if rows else None,
        f"kl_last{LAST_ITERATIONS}": mean(KL_ANALYTIC) if rows else None,
    }


def provenance(results: Path) -> dict[str, Any]:
    """Git commit of the code that ran, whether tracked files other than the study's own results
    (which every finished run rewrites) differ from it, and the machine."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *_excluding(results))),
        "machine": {
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }


def _excluding(path: Path) -> list[str]:
    """The git pathspec that leaves out ``path``: none if it is the repository or lies outside it."""
    resolved = path.resolve()
    if resolved == REPO or REPO not in resolved.parents:
        return []
    return [f":(exclude){resolved.relative_to(REPO)}"]


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def eval_task(args: Args, prompts: list[str]) -> ContinuationTask:
    return ContinuationTask(
        model=args.model,
        reward=args.reward,
        positive_label=args.positive_label,
        prompts=prompts,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )


def load_policy_lm(out: Path, device: str):
    """The trained LM from the run's Hugging Face export (``--out/policy``, written at the end)."""
    return load_causal_lm(str(out / POLICY))[0].to(device)


def evaluate_run(options: argparse.Namespace, args: Args, prompts: list[str], out: Path | None) -> dict[str, Any]:
    """Evaluate the final policy in ``out`` (or, with None, the untrained reference policy)."""
    task = eval_task(args, prompts)
    start = time.perf_counter()
    policy_lm = task.ref_model if out is None else load_policy_lm(out, args.device)
    scores = evaluate_held_out(policy_lm, task, prompts, options.eval_seed, options.eval_batch)
    return {**eval_metrics(scores, options.eval_seed), "seconds": time.perf_counter() - start}


def held_out_prompts(args: Args, n: int | None) -> list[str]:
    prompts = load_prompts(args.dataset, split=HELD_OUT)
    if n is not None:
        if n < 1 or n > len(prompts):
            raise ValueError(f"--eval-prompts must be in [1, {len(prompts)}], got {n}")
        prompts = prompts[:n]
    return prompts


def run_study(options: argparse.Namespace) -> int:
    """Run every missing run of the grid; the number of runs that failed."""
    for name in ("iters", "eval_batch"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("betas", "seeds"):
        bad = [value for value in getattr(options, name) if not (math.isfinite(value) and value >= 0)]
        if bad:
            raise ValueError(f"--{name} must be finite and >= 0, got {bad}")
    base = check_config(options.config)
    prompts = held_out_prompts(base, options.eval_prompts)
    lock = lock_run_dir(options.study_dir)  # before anything in it is deleted; held until the end
    try:
        return _run_study_locked(options, base, prompts)
    finally:
        lock.close()


def _run_study_locked(options: argparse.Namespace, base: Args, prompts: list[str]) -> int:
    runs_dir = options.results / RUN_RESULTS
    reference = options.results / "reference.json"
    if not reference.is_file():
        print(f"evaluating the reference policy on {len(prompts)} held-out prompts", flush=True)
        config = {"base": dataclasses.asdict(base)}
        write_json(reference, {"run_id": "reference", **config, **provenance(options.results), "eval": evaluate_run(options, base, prompts, None)})
    failed = 0
    for run in grid(options.variants, options.betas, options.seeds):
        result = runs_dir / f"{run.run_id}.json"
        if result.is_file():
            print(f"{run.run_id}: done, skipped", flush=True)
            continue
        out = options.study_dir / run.run_id
        print(f"{run.run_id}: training in {out}", flush=True)
        if not train(options.config, run, options.iters, out):
            print(f"{run.run_id}: training failed, see {out / TRAIN_LOG}", flush=True)
            failed += 1
            continue
        args = parse_args(run_args(options.config, run, options.iters, out, resume=False))
        evaluation = evaluate_run(options, args, prompts, out)
        record = {
            "run_id": run.run_id,
            "variant": run.variant,
            "label": VARIANTS[run.variant].label,
            "beta": run.beta,
            "seed": run.seed,
            "config": dataclasses.asdict(args),
            **provenance(options.results),
            "train": train_metrics(out),
            "eval": evaluation,
        }
        write_json(result, record)
        if not options.keep_checkpoints:
            (out / CHECKPOINT).unlink(missing_ok=True)
            shutil.rmtree(out / POLICY, ignore_errors=True)
        ev = record["eval"]
        print(
            f"{run.run_id}: sentiment {ev['sentiment']['mean']:+.3f}  KL {ev['kl']['mean']:.3f}  "
            f"perplexity {ev['perplexity']:.1f}  distinct-2 {ev['distinct_2']:.3f}",
            flush=True,
        )
        write_report(options.results, VARIANTS)
    write_report(options.results, VARIANTS)
    return failed


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        if options.report:
            write_report(options.results, VARIANTS)
            return 0
        failed = run_study(options)
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if failed:
        print(f"{failed} run(s) failed; rerun the same command to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
