"""PPOKL on 1 vs W CPU ranks (torchrun, gloo) at the same global batch, and the cost of one
gradient all-reduce of the embedded SmolLM2-135M.

For each rank count (alternating, ``--repeats`` times) it runs

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node W -m agents.ppo_kl \\
        --n-envs TOTAL/W --iters I --eval-every 0 --analytic-grad --kl-reward analytic ...

and reads ``time/iteration_seconds`` and ``time/rollout_tokens_per_s`` of the last iteration
from ``metrics.csv`` (the first pays one-off allocations). Then it times ``dist.all_reduce`` of a
flat float32 tensor with the model's parameter count on W gloo ranks.

    python bench/bench_ranks.py [--total-envs 8] [--ranks 1 2] [--iters 2] [--repeats 1] [--lora-rank 0] [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from agents import metrics

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_135M_PARAMETERS = 134_515_008


def torchrun(n_ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_ranks)]


def run_training(n_ranks: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    flags = [
        "--n-envs", str(args.total_envs // n_ranks), "--iters", str(args.iters), "--eval-every", "0",
        "--save-every", "1000", "--max-new-tokens", str(args.max_new_tokens), "--n-epochs", str(args.n_epochs),
        "--batch-size", str(args.batch_size), "--analytic-grad", "--kl-reward", "analytic", "--out", str(out),
        "--lora-rank", str(args.lora_rank), "--model", args.model,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(torchrun(n_ranks) + ["-m", "agents.ppo_kl", *flags], cwd=REPO, env=env, check=True, capture_output=True)
    with (out / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return {key: float(last[key]) for key in (metrics.ITERATION_SECONDS, metrics.ROLLOUT_TOKENS_PER_S, metrics.GEN_LENGTH)}


def allreduce_worker(n_elements: int, repeats: int) -> None:
    """Run under torchrun: rank 0 prints the median seconds of one all-reduce."""
    dist.init_process_group("gloo")
    flat = torch.ones(n_elements)
    seconds = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        seconds.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(f"ALLREDUCE {np.median(seconds[1:]):.4f}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-envs", type=int, default=8, help="episodes per iteration over all ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--n-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=192, help="minibatch in tokens per rank")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters instead of full fine-tuning (less memory)")
    parser.add_argument("--model", default="smollm2-135m", help="policy and reference LM (the embedded one, or a local folder)")
    parser.add_argument("--allreduce-elements", type=int, default=SMOLLM2_135M_PARAMETERS, help="floats in the timed all-reduce (default: SmolLM2-135M's parameters)")
    parser.add_argument("--allreduce-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker, repeats=3)
        return
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.ranks}
    for _ in range(args.repeats):
        for n_ranks in args.ranks:  # alternate, so machine load hits all alike
            with tempfile.TemporaryDirectory() as tmp:
                results[n_ranks].append(run_training(n_ranks, args, Path(tmp) / "run"))
    print(f"{args.total_envs} episodes x {args.max_new_tokens} tokens per iteration in total, {args.n_epochs} epoch(s), "
          f"minibatch {args.batch_size} tokens per rank, LoRA rank {args.lora_rank or 'off'}; last of {args.iters} iterations; medians of {args.repeats}\n")
    print("| ranks | episodes per rank | iteration s | rollout tokens/s (all ranks) | one gradient all-reduce s |")
    print("|---|---|---|---|---|")
    for n_ranks, runs in results.items():
        allreduce = "-"
        if n_ranks > 1:
            done = subprocess.run(torchrun(n_ranks) + [__file__, "--allreduce-worker", str(args.allreduce_elements)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, text=True)
            allreduce = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("ALLREDUCE"))
        iteration = np.median([r[metrics.ITERATION_SECONDS] for r in runs])
        tokens = np.median([r[metrics.ROLLOUT_TOKENS_PER_S] for r in runs])
        print(f"| {n_ranks} | {args.total_envs // n_ranks} | {iteration:.1f} | {tokens:.0f} | {allreduce} |")


if __name__ == "__main__":
    main()
