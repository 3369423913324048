"""The training run behind ``python -m agents.ppo_kl`` (``agents.ppo_kl`` parses the flags first, so
``--help`` and bad flags answer before this module loads torch): the envs, the model, the locked run directory and the finish
steps; ``run`` turns every user error into one line and exit 2.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import shlex
import sys
from pathlib import Path

import gymnasium as gym
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.logger import Logger

import lmgym  # noqa: F401  (registers IMDBContinuation-v0)
from lmgym.assets import AssetUnavailableError
from agents import distributed
from agents.algorithm import PPOKL
from agents.state.checkpoint import CheckpointMeta, read_meta
from agents.cli.config import Args, differing_settings, ppokl_settings
from agents.device import DTYPES, cast_frozen, fp32_output_layer, precision_warning
from agents.cli.finish import finish
from agents.lora import share_base_as_reference
from agents.cli.monitor import TrainingMonitor
from agents.cli.ownership import check_claimable, check_out, claim
from agents.cli.run_dir import (
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

__all__ = ["run", "train"]


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
    cast_frozen(train.unwrapped.reference_model, DTYPES[args.dtype])
    if args.cast_lm_head_to_fp32:
        fp32_output_layer(train.unwrapped.reference_model)
    if not args.eval_every or not distributed.is_main():
        return LMGymVecEnv(train), None
    evaluation = gym.make_vec(
        "IMDBContinuation-v0",
        num_envs=args.eval_prompts,
        vectorization_mode="vector_entry_point",
        ref_model=train.unwrapped.reference_model,
        tokenizer=train.unwrapped.tokenizer,
        reward=train.unwrapped.reward_model,
        dataset=args.dataset,
        split="test",
        **common,
    )
    return LMGymVecEnv(train), LMGymVecEnv(evaluation)


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
    config = env.reference_model.config
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
    warning = precision_warning(args.device, args.dtype)
    if warning and distributed.is_main():
        print(warning, file=sys.stderr)
    out = check_out(args.out)
    if distributed.is_main():
        check_unlocked(out)
        check_claimable(out)
    resume = resumes_checkpoint(args, out)
    if resume:
        check_resumable(args, out)
    checked = _run_files_state(out)
    distributed.barrier()  # every rank has checked --out before rank 0 writes into it
    env, eval_env = make_envs(args)
    check_context(args, env)
    model = build_model(args, env, out, resume)
    if model.policy.lora_rank:
        share_base_as_reference(model, [e for e in (env, eval_env) if e is not None])
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
        claim(out)
        remove_stale_temporaries(out)
        rewind(out, model.n_iterations, model.num_timesteps)
        atomic_write(out / ARGS, lambda tmp: tmp.write_text(json.dumps(run, indent=2)))
        model.set_logger(make_logger(out))
        callback = TrainingMonitor(out, args.iters, eval_env, args.eval_every, args.save_every, run=run)
    else:
        model.set_logger(Logger(folder=None, output_formats=[]))
        callback = distributed.IterationLimit(args.iters)
    remaining = max(args.iters - model.n_iterations, 0)
    if not remaining and distributed.is_main():
        print(f"--resume: the run in {out} has already finished its {args.iters} iterations; nothing to train "
              f"(finishing any missing export; a larger --iters trains further)", file=sys.stderr)
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
        finish(model, args, out, env.tokenizer, eval_env)
    return model


def _interrupted(out: Path) -> str:
    """The line printed on Ctrl-C: where the run can continue from."""
    try:
        at = f"at iteration {read_meta(out / CHECKPOINT).counters.n_iterations}"
    except (OSError, ValueError):
        at = "before its first checkpoint"
    return f"interrupted: the run in {out} is saved {at}; resume with: python -m agents.ppo_kl --out {shlex.quote(str(out))} --resume"


def run(args: Args) -> int:
    """Train ``args``; the exit code: 0, 2 after a one-line error, 130 after Ctrl-C."""
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
    except (OSError, ValueError, FloatingPointError, AssetUnavailableError, csv.Error) as error:
        print(f"error: {' '.join(str(error).split())}"[:2000], file=sys.stderr)
        return 2
    except RecursionError:
        print("error: a file this run reads (--config, args.json or a model's JSON) is nested too deeply", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: lower --n-envs, --max-new-tokens or --batch-size", file=sys.stderr)
        return 2
    except RuntimeError as error:  # torch's allocators report running out of memory as RuntimeError
        if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        print(f"error: out of memory ({' '.join(str(error).split())[:200]}): lower --n-envs, --max-new-tokens or --batch-size", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0

