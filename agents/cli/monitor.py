"""The CLI's SB3 callback: progress bar, metrics.csv, periodic evaluation, checkpoints and curves
(the finish steps after the last iteration are ``agents.cli.finish``)."""
from __future__ import annotations

import time
from pathlib import Path

from stable_baselines3.common.callbacks import BaseCallback
from tqdm import tqdm

from agents.metrics import APPROX_KL, CLIP_FRACTION, ENTROPY_LOSS, EVAL_PREFIX, EXPLAINED_VARIANCE, GEN_LENGTH, ITERATION_SECONDS, KL_ANALYTIC, KL_COEF, KL_IN_REWARD, KL_LOSS, LOSS, MASK_TOKENS, POLICY_GRADIENT_LOSS, ROLLOUT_TOKENS_PER_S, TASK_REWARD, TOKENS_PER_S, VALUE_LOSS
from agents import distributed
from agents.cli import formatting
from agents.cli.run_dir import CURVES, METRICS, read_rows, save_checkpoint, write_rows
from agents.cli.evaluation import evaluate
from agents.cli.plots import plot_curves
from agents.vec_env import LMGymVecEnv

LOGGED = (
    TASK_REWARD,
    KL_ANALYTIC,
    KL_IN_REWARD,
    KL_COEF,
    GEN_LENGTH,
    MASK_TOKENS,
    POLICY_GRADIENT_LOSS,
    VALUE_LOSS,
    ENTROPY_LOSS,
    KL_LOSS,
    LOSS,
    CLIP_FRACTION,
    APPROX_KL,
    EXPLAINED_VARIANCE,
    ROLLOUT_TOKENS_PER_S,
)


class TrainingMonitor(BaseCallback):
    """After each PPO iteration (rollout + update): log a metrics row, evaluate and checkpoint on
    schedule (with the run's arguments ``run``), stop after ``iters`` iterations.

    The checkpoint is written after the iteration's evaluation, at the start of the next rollout,
    so the RNG state it holds is the one the next iteration starts from."""

    def __init__(
        self,
        out: Path,
        iters: int,
        eval_env: LMGymVecEnv | None,
        eval_every: int,
        save_every: int,
        n_samples: int = 3,
        run: dict[str, object] | None = None,
    ):
        super().__init__()
        self.out = out
        self.iters = iters
        self.eval_env = eval_env
        self.eval_every = eval_every
        self.save_every = save_every
        self.n_samples = n_samples
        self.run = run
        self.rows = read_rows(out / METRICS)
        self._seen_iterations = 0
        self._iteration_start = time.perf_counter()
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self._seen_iterations = self.model.n_iterations
        self.bar = tqdm(total=self.iters, initial=self._seen_iterations, desc="PPO-KL", unit="iter", dynamic_ncols=True)
        if self.eval_env is not None and self.eval_every and not self.rows:
            self.rows = [{"iteration": 0, "timesteps": 0, **self._evaluate()}]  # the untrained policy
            write_rows(self.out / METRICS, self.rows)

    def _on_rollout_start(self) -> None:
        self._finish_iteration()
        self._iteration_start = time.perf_counter()

    def _on_step(self) -> bool:
        return self.model.n_iterations < self.iters

    def _on_training_end(self) -> None:
        self._finish_iteration()
        self.close()

    def close(self) -> None:
        """End the progress bar's line (also when training stops on an error)."""
        if self.bar is not None:
            self.bar.close()

    def _finish_iteration(self) -> None:
        """Runs once per completed update (n_iterations advanced since the last call)."""
        iteration = self.model.n_iterations
        if iteration == self._seen_iterations:
            return
        self._seen_iterations = iteration
        logged = self.model.logger.name_to_value
        stats = {**logged, **self.model.rollout_stats}
        seconds = time.perf_counter() - self._iteration_start
        # every rank counts the same num_timesteps: the global count is W times it
        row: dict[str, object] = {"iteration": iteration, "timesteps": self.model.num_timesteps * distributed.world_size()}
        row.update({key: stats[key] for key in LOGGED if key in stats})
        row[ITERATION_SECONDS] = seconds
        n_episodes = self.model.n_envs * distributed.world_size()
        row[TOKENS_PER_S] = float(stats.get(GEN_LENGTH, 0)) * n_episodes / max(seconds, 1e-9)
        if self.eval_env is not None and self.eval_every and (iteration % self.eval_every == 0 or iteration == self.iters):
            row.update(self._evaluate())
        self.rows = [r for r in self.rows if int(r["iteration"]) < iteration] + [row]
        write_rows(self.out / METRICS, self.rows)
        for key, value in row.items():
            if key.startswith(EVAL_PREFIX):
                self.model.logger.record(key, value)
        if iteration % self.save_every == 0 or iteration >= self.iters:
            save_checkpoint(self.model, self.out, self.run)
        plot_curves(self.rows, self.out / CURVES, title=Path(self.out).name)
        self._report(row)

    def _evaluate(self) -> dict[str, float]:
        result = evaluate(self.model.policy, self.eval_env, self.model.reference, sampler=self.model.sampler)
        lines = [f"  eval: sentiment {result.sentiment:+.3f}  perplexity {result.perplexity:.2f}  "
                 f"distinct-1/2 {result.distinct_1:.3f}/{result.distinct_2:.3f}"]
        for prompt, continuation in list(zip(result.prompts, result.continuations))[: self.n_samples]:
            lines.append(f"    ...{prompt[-60:]!r} -> {continuation!r}")
        tqdm.write("\n".join(lines))
        return result.metrics()

    def _report(self, row: dict[str, object]) -> None:
        def fmt(key: str, spec: str = "+.3f") -> str:
            return formatting.fmt(key, row.get(key), spec)

        if self.bar is not None:
            self.bar.set_postfix(reward=fmt(TASK_REWARD), kl=fmt(KL_ANALYTIC, ".3f"))
            self.bar.update(int(row["iteration"]) - self.bar.n)
        tqdm.write(
            f"iter {row['iteration']:>3}  reward {fmt('rollout/task_reward')}  KL {fmt('rollout/kl_analytic', '.3f')}  "
            f"beta {fmt('rollout/kl_coef', '.4f')}  pg {fmt('train/policy_gradient_loss', '+.4f')}  "
            f"vf {fmt('train/value_loss', '.4f')}  kl_loss {fmt('train/kl_loss', '.4f')}  "
            f"clip {fmt('train/clip_fraction', '.3f')}  approx_kl {fmt('train/approx_kl', '.4f')}  "
            f"ev {fmt('train/explained_variance', '+.2f')}  {fmt('time/tokens_per_s', '.1f')} tok/s"
        )
