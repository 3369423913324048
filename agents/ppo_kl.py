"""``python -m agents.ppo_kl``: PPO fine-tuning on IMDBContinuation-v0 with exact KL handling.

    python -m agents.ppo_kl --analytic-grad --kl-reward analytic --iters 20 --out runs/analytic

Writes into ``--out`` (see ``agents.run_dir``): ``metrics.csv``, ``checkpoint.safetensors``
(every ``--save-every`` iterations), ``policy/`` (the trained LM as a Hugging Face folder, at the
end), ``curves.png``, ``args.json`` and SB3's CSV and TensorBoard logs. ``--resume`` continues
the run from its checkpoint exactly: the rows written after it are dropped, and the resumed
iterations reproduce those of an uninterrupted run with the same seed.

NLPO (PPO with the actions restricted to the top-p nucleus of a masking policy that is a copy of
the policy synced every few iterations; see ``agents.masking``):

    python -m agents.ppo_kl --config configs/nlpo_demo.yaml --out runs/nlpo

Data-parallel on W processes (``--n-envs`` per rank; rank 0 writes; see ``agents.distributed``):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m agents.ppo_kl --n-envs 5 --out runs/ddp
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gymnasium as gym
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.logger import Logger

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.assets import AssetUnavailableError
from agents import distributed
from agents.algorithm import PPOKL
from agents.config import Args, parse_args
from agents.device import DTYPES, cast_frozen
from agents.lora import share_base_as_reference
from agents.monitor import TrainingMonitor
from agents.run_dir import ARGS, CHECKPOINT, RUN_FILES, atomic_write, make_logger, remove_stale_temporaries, rewind
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
    cast_frozen(train.unwrapped.task.ref_model, DTYPES[args.dtype])
    if not args.eval_every or not distributed.is_main():
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


def build_model(args: Args, env: LMGymVecEnv, out: Path, resume: bool) -> PPOKL:
    if resume:
        model = PPOKL.load(out / CHECKPOINT, env=env, device=args.device)
        if distributed.world_size() > 1:  # the checkpoint holds rank 0's seed and RNG states
            model.seed = distributed.rank_seed(args.seed)
            model.set_random_seed(distributed.rank_seed(args.seed, model.n_iterations))
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
        ref_logits=args.ref_logits,
        mask_top_k=args.mask_top_k,
        mask_top_p=args.mask_top_p,
        mask_sync_every=args.mask_sync_every,
        policy_kwargs={
            "model": args.model,
            "vf_learning_rate": args.vf_learning_rate,
            "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora_rank": args.lora_rank,
        },
        seed=distributed.rank_seed(args.seed),
        device=args.device,
    )


def resumes_checkpoint(args: Args, out: Path) -> bool:
    """Whether to load the checkpoint in ``out``; refuse to overwrite a run without --resume, and to
    resume where there is no run. A run stopped before its first checkpoint restarts with --resume."""
    has_checkpoint = (out / CHECKPOINT).is_file()
    has_run = any((out / name).exists() for name in RUN_FILES)
    if args.resume and not has_run:
        raise FileNotFoundError(f"--resume: --out {out} holds no run to resume")
    if not args.resume and has_run:
        stopped = "" if has_checkpoint else " (stopped before its first checkpoint: --resume restarts it)"
        raise FileExistsError(f"--out {out} already holds a run{stopped}: pass --resume to continue it or choose another --out")
    if args.resume and not has_checkpoint:
        print(f"--resume: {out} has no checkpoint yet (the run stopped before its first one): restarting it", file=sys.stderr)
    return args.resume and has_checkpoint


def train(args: Args) -> PPOKL:
    args = dataclasses.replace(args, device=distributed.init_from_env(args.device))
    out = Path(args.out)
    resume = resumes_checkpoint(args, out)
    distributed.barrier()  # every rank has checked --out before rank 0 writes into it
    env, eval_env = make_envs(args)
    model = build_model(args, env, out, resume)
    if model.policy.lora_rank:
        share_base_as_reference(model.policy.lm, [e for e in (env, eval_env) if e is not None])
    distributed.broadcast_parameters(model.policy)
    if distributed.is_main():
        remove_stale_temporaries(out)
        rewind(out, model.n_iterations, model.num_timesteps)
        atomic_write(out / ARGS, lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(args), indent=2)))
        model.set_logger(make_logger(out))
        callback = TrainingMonitor(out, args.iters, eval_env, args.eval_every, args.save_every, env.venv.task.tokenizer)
    else:
        model.set_logger(Logger(folder=None, output_formats=[]))
        callback = distributed.IterationLimit(args.iters)
    remaining = max(args.iters - model.n_iterations, 0)
    if remaining:
        model.learn(
            total_timesteps=remaining * env.num_envs * model.n_steps,
            callback=callback,
            reset_num_timesteps=not resume,
        )
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError, AssetUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
