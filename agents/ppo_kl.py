"""``python -m agents.ppo_kl``: PPO fine-tuning on IMDBContinuation-v0 with exact KL handling.

    python -m agents.ppo_kl --analytic-grad --kl-reward analytic --iters 20 --out runs/analytic

Writes into ``--out`` (see ``agents.run_dir``): ``metrics.csv``, ``checkpoint.safetensors``
(every ``--save-every`` iterations), ``policy/`` (the trained LM as a Hugging Face folder with a
model card, at the end), ``curves.png``, ``args.json`` and SB3's CSV and TensorBoard logs, under an
exclusive lock on ``--out``. ``--resume`` continues the run from its checkpoint exactly, once the
checkpoint, the run's settings, the model and the files have been checked against each other:
the rows written after it are dropped, the resumed iterations reproduce those of an
uninterrupted run with the same seed, and the finish steps (``agents.finish``) are completed.
Errors are one line and exit 2; Ctrl-C is one line and exit 130 (docs/reliability.md).

NLPO (PPO with the actions restricted to the top-p nucleus of a masking policy that is a copy of
the policy synced every few iterations; see ``agents.masking``):

    python -m agents.ppo_kl --config configs/nlpo_demo.yaml --out runs/nlpo

Data-parallel on W processes (``--n-envs`` per rank; rank 0 writes; see ``agents.distributed``):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m agents.ppo_kl --n-envs 5 --out runs/ddp
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shlex
import sys
from pathlib import Path

import gymnasium as gym
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.logger import Logger

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.assets import AssetUnavailableError
from agents import distributed
from agents.algorithm import PPOKL
from agents.checkpoint import CheckpointMeta, read_meta
from agents.config import Args, differing_settings, parse_args
from agents.device import DTYPES, cast_frozen, fp32_output_layer
from agents.finish import finish
from agents.lora import share_base_as_reference
from agents.monitor import TrainingMonitor
from agents.run_dir import (
    ARGS,
    CHECKPOINT,
    RUN_FILES,
    RunDirError,
    atomic_write,
    check_run_files,
    check_unlocked,
    lock_run_dir,
    make_logger,
    remove_stale_temporaries,
    rewind,
)
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
    if args.cast_lm_head_to_fp32:
        fp32_output_layer(train.unwrapped.task.ref_model)
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


def ppokl_settings(args: Args) -> dict:
    """The ``PPOKL`` constructor settings of a run (a checkpoint stores the same, as JSON)."""
    return dict(
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
            "cast_lm_head_to_fp32": args.cast_lm_head_to_fp32,
            "lora_rank": args.lora_rank,
        },
        seed=args.seed,
    )


def check_resumable(args: Args, out: Path) -> CheckpointMeta:
    """The checkpoint's metadata, once its settings and its copy of the run's arguments agree with
    ``args`` (args.json and the flags): else ``ValueError`` naming the first differing field."""
    path = out / CHECKPOINT
    meta = read_meta(path)
    if meta.run is not None:
        differing = differing_settings(args, meta.run)
        if differing:
            raise ValueError(
                f"--resume: the run's settings ({out / ARGS} and the flags) differ from those in {path}: "
                f"{'; '.join(differing)}; restore {ARGS} or start a new --out"
            )
    counters = meta.counters
    if counters.num_timesteps != counters.n_iterations * args.n_envs * args.max_new_tokens:
        raise ValueError(
            f"--resume: {path}: fields 'counters.num_timesteps' {counters.num_timesteps} and 'counters.n_iterations' "
            f"{counters.n_iterations} disagree (each iteration is --n-envs x --max-new-tokens = "
            f"{args.n_envs * args.max_new_tokens} timesteps)"
        )
    expected = json.loads(json.dumps(ppokl_settings(args)))
    for name, value in expected.items():
        if name in meta.settings and meta.settings[name] != value:
            raise ValueError(f"--resume: {path} was trained with {name} {meta.settings[name]!r} but the run's settings give {value!r}")
    return meta


def check_context(args: Args, env: LMGymVecEnv) -> None:
    """ValueError if a prompt plus its continuation can exceed the model's context window."""
    config = env.venv.task.ref_model.config
    limit = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, key, None)), None)
    if limit is not None and args.max_prompt_tokens + args.max_new_tokens > limit:
        raise ValueError(
            f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} exceed the context "
            f"window of {args.model} ({limit} positions)"
        )


def build_model(args: Args, env: LMGymVecEnv, out: Path | None = None, resume: bool = False) -> PPOKL:
    if resume:
        model = PPOKL.load(out / CHECKPOINT, env=env, device=args.device)
        if distributed.world_size() > 1:  # the checkpoint holds rank 0's seed and RNG states
            model.seed = distributed.rank_seed(args.seed)
            model.set_random_seed(distributed.rank_seed(args.seed, model.n_iterations))
        return model
    settings = {**ppokl_settings(args), "seed": distributed.rank_seed(args.seed)}
    return PPOKL("CausalLMPolicy", env, device=args.device, **settings)


def resumes_checkpoint(args: Args, out: Path) -> bool:
    """Whether to load the checkpoint in ``out``; refuse to overwrite a run without --resume, and to
    resume where there is no run. A run stopped before its first checkpoint restarts with --resume."""
    has_checkpoint = (out / CHECKPOINT).exists()  # a directory there is an error, not "no checkpoint"
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
    """Run (or resume) the training in ``args.out``: every check before anything in it is changed."""
    args = dataclasses.replace(args, device=distributed.init_from_env(args.device))
    out = Path(args.out)
    if distributed.is_main():
        check_unlocked(out)
    resume = resumes_checkpoint(args, out)
    if resume:
        check_resumable(args, out)
    checked = _run_files_state(out)
    distributed.barrier()  # every rank has checked --out before rank 0 writes into it
    env, eval_env = make_envs(args)
    check_context(args, env)
    model = build_model(args, env, out, resume)
    if model.policy.lora_rank:
        share_base_as_reference(model.policy.lm, [e for e in (env, eval_env) if e is not None])
    distributed.broadcast_parameters(model.policy)
    if distributed.is_main():
        check_run_files(out, model.n_iterations)
    lock = lock_run_dir(out) if distributed.is_main() else None  # the OS releases it if the process dies
    try:
        if distributed.is_main() and _run_files_state(out) != checked:
            raise RunDirError(f"--out {out} changed while this run was starting (another run?): start again")
        return _train_locked(args, out, resume, env, eval_env, model)
    finally:
        if lock is not None:
            lock.close()


def _run_files_state(out: Path) -> list[int | None]:
    """When each run file was last changed (None: absent), to detect a run that wrote between
    this run's checks and its lock."""
    return [(out / name).stat().st_mtime_ns if (out / name).exists() else None for name in RUN_FILES]


def _train_locked(args: Args, out: Path, resume: bool, env: LMGymVecEnv, eval_env: LMGymVecEnv | None, model: PPOKL) -> PPOKL:
    """Training with ``out`` locked and checked: the first function that writes into it."""
    run = dataclasses.asdict(args)
    if distributed.is_main():
        remove_stale_temporaries(out)
        rewind(out, model.n_iterations, model.num_timesteps)
        atomic_write(out / ARGS, lambda tmp: tmp.write_text(json.dumps(run, indent=2)))
        model.set_logger(make_logger(out))
        callback = TrainingMonitor(out, args.iters, eval_env, args.eval_every, args.save_every, run=run)
    else:
        model.set_logger(Logger(folder=None, output_formats=[]))
        callback = distributed.IterationLimit(args.iters)
    remaining = max(args.iters - model.n_iterations, 0)
    try:
        if remaining:
            model.learn(
                total_timesteps=remaining * env.num_envs * model.n_steps,
                callback=callback,
                reset_num_timesteps=not resume,
            )
    finally:
        if isinstance(callback, TrainingMonitor):
            callback.close()
    if distributed.is_main() and model.n_iterations >= args.iters:
        finish(model, args, out, env.venv.task.tokenizer, eval_env)
    return model


def _interrupted(out: Path) -> str:
    """The line printed on Ctrl-C: where the run can continue from."""
    try:
        at = f"at iteration {read_meta(out / CHECKPOINT).counters.n_iterations}"
    except (OSError, ValueError):
        at = "before its first checkpoint"
    return f"interrupted: the run in {out} is saved {at}; resume with: python -m agents.ppo_kl --out {shlex.quote(str(out))} --resume"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        print(_interrupted(Path(args.out)), file=sys.stderr)
        return 130
    except pickle.UnpicklingError:
        print(
            f"error: a pickled weight file (*.bin) of --model {args.model} or --reward {args.reward} holds more than "
            "tensors; unpickling it could run code, so torch.load(weights_only=True) refused it: use safetensors weights",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError, FloatingPointError, AssetUnavailableError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
