"""PPOKL's iteration (``--ref-logits hidden`` and ``store``) against TRL's GRPOTrainer on the same work.

One process, alternating: every GRPOTrainer step is followed (in a ``TrainerCallback``) by one
PPOKL iteration per mode, so load from other processes hits all contenders alike.

- ``PPOKL hidden``: ``collect_rollouts`` + ``train`` of the config (demo: analytic KL reward and
  analytic gradient) with pi_ref's hidden states stored and the update's KL fused;
- ``PPOKL store``: the same model with pi_ref's logits stored (today's default path);
- ``TRL GRPOTrainer`` (the installed ``trl``, 1.16.0 in the lock's ``frameworks`` extra): one
  ``train`` step (generate, reward, reference forward, loss, backward, optimizer step) on
  ``n_envs`` completions as ``n_envs / generations`` prompts x ``generations``, at most
  ``max_new_tokens`` tokens each, the config's prompts (truncated to ``max_prompt_tokens``) and
  reward, ``beta = kl_coef``, ``adamw_torch_fused``, constant learning rate, no gradient
  checkpointing, no vLLM, on CPU. Its rollout phase is the time in
  ``_generate_and_score_completions`` (generation, reward, reference and old-policy forwards), of
  which ``generate`` is the time in ``_generate``; its update is the rest of the step.

``--precision``: ``fp32`` (float32 everywhere) or ``bf16`` (TRL's default ``bf16=True``:
autocast over float32 weights; PPOKL: ``--dtype bfloat16``, the policy under autocast over
float32 weights and the frozen reference stored in bfloat16; add ``--cast-lm-head-to-fp32`` to
keep both output layers in float32, and TRL's ``--trl-cast-lm-head-to-fp32``, which TRL supports
only for untied heads).

The first round is a warm-up; the table gives medians (min-max) of the others, then every
round's iteration times. The last row is PPOKL's FLOP floor (``bench_iteration.work_flops``: its
rollout's and update's matmuls, at the GEMM rate in the run's precision measured in every round
with the model's own weight shapes): no implementation of PPOKL's work in that precision on this
machine can beat it, so floor / TRL bounds the reachable ratio.

    python bench/bench_trl.py [--config configs/demo.yaml] [--rounds 8] [--threads 1] [--precision fp32|bf16] [any agents.ppo_kl flag]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import numpy as np
import torch
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger

from agents.algorithm import PPOKL
from bench_iteration import flop_floor, gemm_rate, work_flops
from agents.cli.config import Args, parse_args
from agents.cli.train import build_model, make_envs
from agents.device import cpu_has_native_bf16, precision_warning
from lmgym.assets import load_tokenizer, resolve

MODES = ("hidden", "store")


def ppokl_iteration(model: PPOKL, callback: CallbackList, mode: str) -> tuple[float, float]:
    """Seconds of one rollout and one update of ``model`` with pi_ref's ``mode``."""
    model.ref_logits = mode
    model.rollout_buffer.store_ref_logits = mode == "store"
    start = time.perf_counter()
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    middle = time.perf_counter()
    model.train()
    return middle - start, time.perf_counter() - middle


class PhaseTimer:
    """Seconds spent in a wrapped method, summed since the last ``take()``."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(obj, name, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def grpo_trainer(args: Args, env, rounds: int, generations: int, out: str, on_step_end, bf16: bool = False, cast_head: bool = False,
                 trainer_class=None, max_steps: int | None = None, **trainer_kwargs):
    """A GRPOTrainer (or ``trainer_class`` with ``trainer_kwargs``) doing one PPOKL iteration's
    work per step, ``max_steps`` steps per ``train()`` (None: ``rounds``); ``on_step_end()`` runs after each."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.n_envs % generations:
        raise SystemExit(f"--n-envs ({args.n_envs}) must be a multiple of --generations ({generations})")
    task = env.venv.task
    rng = np.random.default_rng(args.seed)
    prompts = [task.decode(task.sample_prompt(rng)[1]) for _ in range(rounds * args.n_envs // generations)]

    def reward(prompts, completions, **kwargs) -> list[float]:
        return [float(x) for x in task.score(list(completions))]

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.rollout: list[float] = []
            self.generate: list[float] = []

        def on_step_begin(self, *a, **k):
            gc.collect()
            self.phases[0].take(), self.phases[1].take()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.start)
            self.rollout.append(self.phases[0].take())
            self.generate.append(self.phases[1].take())
            on_step_end()

    config = GRPOConfig(
        output_dir=out,
        use_cpu=torch.device(args.device).type == "cpu",
        per_device_train_batch_size=args.n_envs,
        num_generations=generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=args.kl_coef,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",
        weight_decay=0.0,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        cast_lm_head_to_fp32=cast_head,
        model_init_kwargs={"dtype": torch.float32},
        max_steps=rounds if max_steps is None else max_steps,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )
    timer = Timer()
    trainer = (trainer_class or GRPOTrainer)(
        model=resolve(args.model),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=load_tokenizer(args.model),
        callbacks=[timer],
        **trainer_kwargs,
    )
    timer.phases = (PhaseTimer(trainer, "_generate_and_score_completions"), PhaseTimer(trainer, "_generate"))
    return trainer, timer


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of all contenders (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--generations", type=int, default=4, help="GRPO completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16: TRL's default bf16=True and PPOKL's --dtype bfloat16 (autocast, float32 weights)")
    parser.add_argument("--trl-cast-lm-head-to-fp32", action="store_true", help="TRL's cast_lm_head_to_fp32 (untied heads only)")
    options, run_flags = parser.parse_known_args(argv)
    if options.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (the first is a warm-up)")
    if options.precision == "bf16":
        run_flags = ["--dtype", "bfloat16", *run_flags]
        warning = precision_warning("cpu", "bfloat16")
        if warning:  # the numbers then measure the emulation, on both sides
            print(warning.replace("use --dtype float32 here", "both contenders' bf16 times measure the emulation"), flush=True)
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    args = parse_args(["--config", options.config, "--eval-every", "0", "--seed", str(options.seed), *run_flags])
    env, _ = make_envs(args)
    model = build_model(args, env, out=None, resume=False)  # type: ignore[arg-type]
    model.set_logger(Logger(folder=None, output_formats=[]))
    _, callback = model.setup_learn(10**9, CallbackList([]))
    callback.on_training_start(locals(), globals())
    ppokl: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    rates: list[float] = []

    def ppokl_round() -> None:
        for mode in MODES:
            gc.collect()
            ppokl[mode].append(ppokl_iteration(model, callback, mode))
        tokens = args.n_envs * (args.max_prompt_tokens + args.max_new_tokens)
        rates.append(gemm_rate(model.policy.lm, tokens, dtype=torch.bfloat16 if options.precision == "bf16" else torch.float32,
                               device=model.policy.device))
        done = ", ".join(f"PPOKL {mode} {sum(ppokl[mode][-1]):.2f}" for mode in MODES)
        print(f"round {len(rates)} of {options.rounds} (s): TRL GRPOTrainer {timer.seconds[-1]:.2f}, {done}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        trainer, timer = grpo_trainer(args, env, options.rounds, options.generations, out, ppokl_round,
                                      bf16=options.precision == "bf16", cast_head=options.trl_cast_lm_head_to_fp32)
        trainer.train()
    rows = {f"PPOKL {mode}": [r + u for r, u in times[1:]] for mode, times in ppokl.items()}
    rows["TRL GRPOTrainer"] = timer.seconds[1:]
    import trl

    print(f"\n{options.config}: {args.n_envs} completions of <= {args.max_new_tokens} tokens per iteration "
          f"(GRPO: {args.n_envs // options.generations} prompts x {options.generations}), prompts <= "
          f"{args.max_prompt_tokens} tokens, {args.n_epochs} PPO epoch(s); precision {options.precision} (PPOKL --dtype {args.dtype}"
          f"{', --cast-lm-head-to-fp32' if args.cast_lm_head_to_fp32 else ''}); trl {trl.__version__}; torch threads "
          f"{torch.get_num_threads()}; CPU {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}; medians (min-max) of {options.rounds - 1} alternating rounds after 1 warm-up\n")
    print("| contender | iteration (s) | rollout (s) | of which generate (s) | update (s) | / TRL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    trl_median = statistics.median(rows["TRL GRPOTrainer"])
    for mode, times in ppokl.items():
        measured = times[1:]
        print(f"| PPOKL {mode} | {spread(rows[f'PPOKL {mode}'])} | {spread([r for r, _ in measured])} | "
              f"- | {spread([u for _, u in measured])} | {statistics.median(rows[f'PPOKL {mode}']) / trl_median:.2f} |")
    trl_update = [s - r for s, r in zip(timer.seconds[1:], timer.rollout[1:])]
    print(f"| TRL GRPOTrainer | {spread(rows['TRL GRPOTrainer'])} | {spread(timer.rollout[1:])} | {spread(timer.generate[1:])} | "
          f"{spread(trl_update)} | 1.00 |")
    rate = statistics.median(rates[1:])
    flops = work_flops(model.policy.lm, args)
    floor = flop_floor(flops, rate)
    print(f"| PPOKL FLOP floor at {rate / 1e9:.0f} GFLOP/s ({options.precision}) | {sum(floor.values()):.2f} | "
          f"{floor['rollout']:.2f} | - | {floor['update']:.2f} | {sum(floor.values()) / trl_median:.2f} |")
    extra = flops["hidden_extra"] / rate
    print(f"| PPOKL hidden's extra output-layer passes at that rate (1 + 3 x {args.n_epochs} epoch(s)) | {extra:.2f} | - | - | - | "
          f"{extra / trl_median:.2f} |")
    print("\nper round (s), iteration:")
    for name, times in rows.items():
        print(f"- {name}: {', '.join(f'{t:.2f}' for t in times)}", flush=True)


if __name__ == "__main__":
    main()
