"""Memory and time of one PPOKL iteration with the reference logits stored, recomputed or fused from hidden states.

Runs one iteration (rollout + update, ``--analytic-grad --kl-reward analytic``) of the embedded
SmolLM2-135M in a fresh child process per measurement, alternating the modes, and reports:

- the bytes the rollout buffer holds for pi_ref (``N x T x V x 4`` logits for ``store``, 0 for
  ``recompute``, ``N x T x d x 4`` hidden states for ``hidden``) and the largest per-minibatch
  logits tensor (``b x T x V x 4``; none in ``hidden``);
- the peak resident memory during the rollout and during the update of a second iteration,
  above the resident memory before that iteration
  (sampled every 5 ms from /proc/self/statm; the first iteration allocates gradients and AdamW's
  state, identical in both modes, and its buffer's logits are freed before the second);
- the rollout and update seconds.

    python bench/bench_memory.py [--n-envs 16] [--max-new-tokens 48] [--batch-size 192] [--n-epochs 1] [--repeats 2] [--threads 1] [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

MODES = ("store", "recompute", "hidden")


class PeakRSS:
    """Highest resident set size (bytes) seen by a sampling thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def one_iteration(mode: str, n_envs: int, max_new_tokens: int, batch_size: int, n_epochs: int, model_name: str) -> dict[str, float]:
    """Child process: build, run a warm-up iteration, then measure the second one."""
    import lmgym  # noqa: F401  (registers the env)
    from agents import LMGymVecEnv, PPOKL

    venv = gym.make_vec(
        "IMDBContinuation-v0",
        num_envs=n_envs,
        vectorization_mode="vector_entry_point",
        max_new_tokens=max_new_tokens,
        autoreset_mode=AutoresetMode.SAME_STEP,
        model=model_name,
    )
    model = PPOKL(
        "CausalLMPolicy",
        LMGymVecEnv(venv),
        analytic_grad=True,
        kl_reward="analytic",
        ref_logits=mode,
        batch_size=batch_size,
        n_epochs=n_epochs,
        learning_rate=1e-6,
        seed=0,
        policy_kwargs={"model": model_name},
    )
    _, callback = model.setup_learn(total_timesteps=10**9, callback=None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    model.train()  # warm-up: allocates the gradients and AdamW's state, the same in both modes
    model.rollout_buffer.ref_logits = model.rollout_buffer.ref_hidden = None  # the baseline holds neither in any mode
    gc.collect()
    before = PeakRSS.current()
    with PeakRSS() as rollout_rss:
        start = time.perf_counter()
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        rollout = time.perf_counter() - start
    with PeakRSS() as update_rss:
        start = time.perf_counter()
        model.train()
        update = time.perf_counter() - start
    buffer = model.rollout_buffer
    sequences = min(n_envs, max(1, round(batch_size / buffer.n_steps)))
    return {
        "stored_bytes": sum(0 if x is None else x.nbytes for x in (buffer.ref_logits, buffer.ref_hidden)),
        "minibatch_logits_bytes": 0 if mode == "hidden" else sequences * buffer.n_steps * buffer.vocab_size * 4,
        "rollout_peak": rollout_rss.peak - before,
        "update_peak": update_rss.peak - before,
        "rollout_s": rollout,
        "update_s": update,
        "T": buffer.n_steps,
        "V": buffer.vocab_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=192, help="minibatch in tokens (rounded to sequences)")
    parser.add_argument("--n-epochs", type=int, default=1, help="PPO epochs (recompute adds one reference forward per minibatch per epoch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m", help="policy and reference LM (the embedded one, or a local folder)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_iteration(args.child, args.n_envs, args.max_new_tokens, args.batch_size, args.n_epochs, args.model)))
        return
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(repo)}
    for _ in range(args.repeats):
        for mode in MODES:  # alternate, so machine load hits both alike
            child = [__file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
            done = subprocess.run([sys.executable, *child], env=env, capture_output=True, text=True, check=True, cwd=repo)
            results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = results["store"][0]
    mib = 2**20
    print(f"N={args.n_envs} sequences, T={first['T']} tokens, V={first['V']}, batch {args.batch_size} tokens, {args.n_epochs} epoch(s); "
          f"{args.repeats} alternating runs per mode, medians; {args.threads} thread(s)\n")
    print("| ref logits | stored for pi_ref MiB | per-minibatch [b,T,V] MiB | peak RSS increase, rollout MiB | peak RSS increase, update MiB | rollout s | update s |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        print(f"| {mode} | {med['stored_bytes'] / mib:.0f} | {med['minibatch_logits_bytes'] / mib:.1f} | "
              f"{med['rollout_peak'] / mib:.0f} | {med['update_peak'] / mib:.0f} | {med['rollout_s']:.1f} | {med['update_s']:.1f} |")
    for mode in ("recompute", "hidden"):
        ratios = [r["update_s"] / s["update_s"] for s, r in zip(results["store"], results[mode])]
        print(f"\nupdate time {mode}/store, paired runs: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
