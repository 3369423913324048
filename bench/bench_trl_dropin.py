"""The drop-in's cost: ``KLGRPOTrainer`` against plain ``GRPOTrainer``, step time and peak memory.

Every contender is a TRL 1.16 trainer with the same ``GRPOConfig`` as ``bench_trl.py`` (the run
config's model, prompts, reward, ``n_envs`` completions per step, ``beta = kl_coef``):

- ``GRPOTrainer``: TRL's own k3 KL term;
- ``KLGRPOTrainer <estimator>``: ``kl_estimators.integrations.trl.KLGRPOTrainer`` with that
  ``kl_estimator`` (default: ``k3-ratio``, ``reinforce-future-is``, ``analytic-future-is``).

Rounds alternate the contenders in one process: each round runs ``train()`` for one step of every
contender in turn (the same first batch every round; setup outside the timed step), so load from
other processes hits all alike; the first round is a warm-up. Step time is the wall-clock from
``on_step_begin`` to ``on_step_end``; "peak extra" is the process's peak RSS during the step (the
kernel's high-water mark reset through /proc/self/clear_refs just before it) minus the RSS at its
start: the step's temporaries, independent of the machine's load. ``--precision bf16`` is TRL's
default ``bf16=True`` (autocast over float32 weights).

    python bench/bench_trl_dropin.py [--config configs/demo.yaml] [--rounds 6] [--threads 1] [--precision fp32|bf16] [--estimators ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from bench_fused import _reset_peak_rss, _status_bytes
from bench_trl import grpo_trainer, spread
from transformers import TrainerCallback

from agents.cli.config import parse_args
from agents.cli.train import make_envs

ESTIMATORS = ("k3-ratio", "reinforce-future-is", "analytic-future-is")


class PeakMemory(TrainerCallback):
    """Peak RSS beyond the RSS at the step's start, per step."""

    def __init__(self):
        self.bytes: list[int] = []

    def on_step_begin(self, *args, **kwargs):
        self.start = _reset_peak_rss()

    def on_step_end(self, *args, **kwargs):
        self.bytes.append(_status_bytes("VmHWM") - self.start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all contenders (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--generations", type=int, default=4, help="GRPO completions per prompt")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), help="KLGRPOTrainer kl_estimator values")
    parser.add_argument("--seed", type=int, default=0)
    options, run_flags = parser.parse_known_args(argv)
    if options.rounds < 2:
        parser.exit(2, "--rounds must be >= 2 (the first is a warm-up)\n")
    from kl_estimators.info import ESTIMATOR_INFO
    from kl_estimators.integrations.trl import KLGRPOTrainer

    unknown = [name for name in options.estimators if name not in ESTIMATOR_INFO]
    if unknown:
        parser.exit(2, f"unknown --estimators {unknown}: choose from {tuple(ESTIMATOR_INFO)}\n")
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    args = parse_args(["--config", options.config, "--eval-every", "0", "--seed", str(options.seed), *run_flags])
    env, _ = make_envs(args)
    bf16 = options.precision == "bf16"
    with tempfile.TemporaryDirectory() as out:
        contenders = {"GRPOTrainer": grpo_trainer(args, env, 1, options.generations, out, lambda: None, bf16=bf16, max_steps=1)}
        for name in options.estimators:
            contenders[f"KLGRPOTrainer {name}"] = grpo_trainer(
                args, env, 1, options.generations, out, lambda: None, bf16=bf16, trainer_class=KLGRPOTrainer,
                max_steps=1, kl_estimator=name,
            )  # fmt: skip
        memory = {}
        for name, (trainer, _) in contenders.items():
            memory[name] = PeakMemory()
            trainer.add_callback(memory[name])
        for _ in range(options.rounds):
            for trainer, _ in contenders.values():
                trainer.train()
    import trl

    print(f"\n{options.config}: {args.n_envs} completions of <= {args.max_new_tokens} tokens per step "
          f"({args.n_envs // options.generations} prompts x {options.generations}), beta {args.kl_coef}; precision "
          f"{options.precision}; trl {trl.__version__}; torch threads {torch.get_num_threads()}; medians (min-max) of "
          f"{options.rounds - 1} alternating rounds after 1 warm-up\n")
    print("| contender | step (s) | / GRPOTrainer | rollout (s) | update (s) | peak extra (MiB) | per round (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    base = statistics.median(contenders["GRPOTrainer"][1].seconds[1:])
    for name, (_, timer) in contenders.items():
        steps, rollout = timer.seconds[1:], timer.rollout[1:]
        update = [s - r for s, r in zip(steps, rollout)]
        peak = statistics.median(memory[name].bytes[1:]) / 2**20
        print(f"| {name} | {spread(steps)} | {statistics.median(steps) / base:.2f} | {spread(rollout)} | {spread(update)} | "
              f"{peak:.0f} | {', '.join(f'{t:.2f}' for t in steps)} |", flush=True)


if __name__ == "__main__":
    main()
