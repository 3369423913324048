"""``python -m agents.ppo_kl``: PPO fine-tuning on IMDBContinuation-v0 with exact KL handling.

    python -m agents.ppo_kl --analytic-grad --kl-reward analytic --iters 20 --out runs/analytic

Writes ``metrics.csv``, ``checkpoint.zip`` (atomically), ``curves.png`` and SB3's CSV and
TensorBoard logs into ``--out``; ``--resume`` continues from the checkpoint there.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gymnasium as gym
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.logger import configure

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.assets import AssetUnavailableError
from agents.algorithm import PPOKL
from agents.checkpoint import CHECKPOINT, METRICS, read_metrics, write_metrics
from agents.config import Args, parse_args
from agents.monitor import TrainingMonitor
from agents.vec_env import LMGymVecEnv

__all__ = ["PPOKL", "main"]


def make_envs(args: Args) -> tuple[LMGymVecEnv, LMGymVecEnv | None]:
    """The training env (train prompts) and an evaluation env on held-out prompts sharing its
    reference model, tokenizer and reward model."""
    common = dict(
        model=args.model,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        autoreset_mode=AutoresetMode.SAME_STEP,
        step_ref_logits=False,  # PPOKL scores pi_ref in one forward after sampling
    )
    train = gym.make_vec(
        "IMDBContinuation-v0",
        num_envs=args.n_envs,
        vectorization_mode="vector_entry_point",
        reward=args.reward,
        positive_label=args.positive_label,
        dataset=args.dataset,
        split="train",
        **common,
    )
    if not args.eval_every:
        return LMGymVecEnv(train), None
    evaluation = gym.make_vec(
        "IMDBContinuation-v0",
        num_envs=args.eval_prompts,
        vectorization_mode="vector_entry_point",
        ref_model=train.unwrapped.task.ref_model,
        tokenizer=train.unwrapped.task.tokenizer,
        reward=train.unwrapped.task.reward_model,
        dataset=args.dataset,
        split="test",
        **common,
    )
    return LMGymVecEnv(train), LMGymVecEnv(evaluation)


def build_model(args: Args, env: LMGymVecEnv, out: Path) -> PPOKL:
    if args.resume:
        model = PPOKL.load(out / CHECKPOINT, env=env, device=args.device)
        rows = [row for row in read_metrics(out / METRICS) if int(row["iteration"]) <= model.n_iterations]
        write_metrics(out / METRICS, rows)
        return model
    return PPOKL(
        "CausalLMPolicy",
        env,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        gamma=args.gamma,
        gae_lambda=args.gae_lambda,
        clip_range=args.clip_range,
        normalize_advantage=args.normalize_advantage,
        ent_coef=args.ent_coef,
        vf_coef=args.vf_coef,
        max_grad_norm=args.max_grad_norm,
        kl_coef=args.kl_coef,
        kl_target=args.target_kl,
        kl_horizon=args.kl_horizon,
        kl_reward=args.kl_reward,
        analytic_grad=args.analytic_grad,
        kl_loss=args.kl_loss,
        policy_kwargs={"model": args.model, "vf_learning_rate": args.vf_learning_rate},
        seed=args.seed,
        device=args.device,
    )


def check_out_dir(args: Args, out: Path) -> None:
    """Refuse to overwrite a previous run unless resuming it; refuse to resume nothing."""
    if args.resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    if not args.resume and ((out / CHECKPOINT).exists() or (out / METRICS).exists()):
        raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it or choose another --out")


def train(args: Args) -> PPOKL:
    out = Path(args.out)
    check_out_dir(args, out)
    env, eval_env = make_envs(args)
    model = build_model(args, env, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model.set_logger(configure(str(out / "sb3_logs"), ["csv", "tensorboard"]))
    monitor = TrainingMonitor(out, args.iters, eval_env, args.eval_every, args.save_every)
    remaining = max(args.iters - model.n_iterations, 0)
    if remaining:
        model.learn(
            total_timesteps=remaining * env.num_envs * model.n_steps,
            callback=monitor,
            reset_num_timesteps=not args.resume,
        )
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (FileExistsError, FileNotFoundError, ValueError, FloatingPointError, AssetUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
