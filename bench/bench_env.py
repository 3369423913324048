"""Steps per second of IMDBContinuation with the embedded SmolLM2-135M reference model.

Compares, for N sequences of ``max_new_tokens`` random tokens each:

- the batched vector env (one cached forward of length 1 per step for all N);
- N single envs stepped in a loop (one cached forward per sequence per step);
- a naive batched baseline that re-encodes the whole left-padded prefix every step (no KV cache),
  timed on a few evenly spaced steps (see ``bench_naive``).

Prints a Markdown table; "env steps/s" counts each sub-env step.

    python bench/bench_env.py [--num-envs 16] [--max-new-tokens 48] [--episodes 1] [--naive-samples 6] [--threads 1] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmgym.assets import load_causal_lm
from lmgym.decoding import position_ids_from_mask
from lmgym.env import IMDBContinuationEnv
from lmgym.prompts import load_prompts
from lmgym.task import ContinuationTask
from lmgym.vector_env import IMDBContinuationVectorEnv


def bench_vector(shared: dict, num_envs: int, steps: int, rng: np.random.Generator) -> float:
    envs = IMDBContinuationVectorEnv(num_envs=num_envs, **shared)
    envs.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        envs.step(rng.integers(envs.single_action_space.n, size=num_envs))
    return time.perf_counter() - start


def bench_single_loop(shared: dict, num_envs: int, steps: int, rng: np.random.Generator) -> float:
    envs = [IMDBContinuationEnv(**shared) for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    start = time.perf_counter()
    for _ in range(steps):
        for env in envs:
            _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            if terminated or truncated:
                env.reset()
    return time.perf_counter() - start


@torch.no_grad()
def bench_naive(task: ContinuationTask, num_envs: int, steps: int, rng: np.random.Generator, samples: int) -> float:
    """Full forward over the whole left-padded batch at a step (what a cache avoids).

    Its cost grows with the prefix, and timing every step takes minutes on a CPU, so this times
    ``samples`` evenly spaced steps and returns their mean scaled to ``steps`` steps.
    """
    prompts = [task.sample_prompt(rng)[1] for _ in range(num_envs)]
    seconds = []
    for step in np.linspace(0, steps - 1, samples).round().astype(int):
        sequences = [tokens + rng.integers(task.vocab_size, size=step).tolist() for tokens in prompts]
        input_ids, attention_mask = task.batch(sequences)
        start = time.perf_counter()
        logits = task.ref_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=1,
        ).logits[:, -1]
        logits.log_softmax(-1)
        seconds.append(time.perf_counter() - start)
    return float(np.mean(seconds)) * steps


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--episodes", type=int, default=1, help="episodes of max-new-tokens steps per setting")
    parser.add_argument("--naive-samples", type=int, default=6, help="steps timed for the naive baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--model", default="smollm2-135m", help="reference LM (the embedded one, or a local folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm(args.model)
    shared = dict(model=model, ref_model=model, tokenizer=tokenizer, prompts=load_prompts(), max_new_tokens=args.max_new_tokens)
    steps = args.episodes * args.max_new_tokens
    task = ContinuationTask(**shared)
    n = args.num_envs
    timings = {
        f"vector env, N={n} (batched, KV cache)": bench_vector(shared, n, steps, np.random.default_rng(0)),
        f"{n} single envs in a loop (KV cache)": bench_single_loop(shared, n, steps, np.random.default_rng(0)),
        f"naive batched, N={n} (full prefix each step)": bench_naive(
            task, n, steps, np.random.default_rng(0), args.naive_samples
        ),
    }
    print(f"\n{args.model}, CPU threads={torch.get_num_threads()}, {steps} batched steps of {n} sequences, "
          f"max_new_tokens={args.max_new_tokens}, random actions\n")
    print("| setting | env steps/s | ms per batched step |")
    print("| --- | ---: | ---: |")
    for name, seconds in timings.items():
        print(f"| {name} | {n * steps / seconds:.1f} | {1000 * seconds / steps:.1f} |")


if __name__ == "__main__":
    main()
