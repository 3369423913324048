"""The run's arguments: one dataclass mirrored by the CLI flags and the YAML config keys.

Defaults follow the seed's IMDB config where it applies (RL4LMs GPT-2 IMDB PPO: 10 envs,
64 prompt tokens, 48 new tokens, 5 epochs, batch 64, lr 1e-6, beta 0.1).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from agents.advantages import KL_REWARDS
from agents.algorithm import KL_LOSSES, check_kl_options
from agents.device import DTYPES, device_error
from agents.reference import REF_LOGITS_MODES


def _arg(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Args:
    """Everything a PPO-KL run needs; each field is a CLI flag (``--kl-coef``) and a YAML key."""

    # assets (passed through to the env)
    model: str = _arg("smollm2-135m", "policy/reference LM: 'smollm2-135m' (embedded), a local path or a Hub id")
    reward: str = _arg("vader", "reward model: 'vader' (embedded) or a text-classification model path/Hub id")
    positive_label: int = _arg(1, "index of the positive label of a classifier reward")
    dataset: str = _arg("bundled", "prompts: 'bundled', 'stanfordnlp/imdb', or a local csv/json/parquet with a text column")
    max_prompt_tokens: int = _arg(64, "prompt length in tokens (truncated from the left)")
    max_new_tokens: int = _arg(48, "tokens generated per episode")
    n_envs: int = _arg(10, "prompts per rollout (batched env size)")
    # KL handling
    kl_coef: float = _arg(0.1, "beta: weight of the KL penalty (initial value with --target-kl)")
    target_kl: float | None = _arg(None, "target sequence KL for the adaptive controller (omit for a fixed beta)")
    kl_horizon: int = _arg(10_000, "horizon (in episodes) of the adaptive KL controller")
    kl_reward: str = _arg("k1", "per-token KL in the reward", choices=KL_REWARDS)
    analytic_grad: bool = _arg(False, "add the exact per-position KL to the loss and drop the current token's KL from its advantage")
    kl_loss: str | None = _arg(None, "GRPO-style autodiff KL loss, for study", choices=KL_LOSSES)
    ref_logits: str = _arg("store", "reference logits for the analytic KL: 'store' [N, T, V] from the rollout, or 'recompute' per minibatch (no storage, one extra reference forward)", choices=REF_LOGITS_MODES)
    # PPO
    learning_rate: float = _arg(1e-6, "learning rate of the language model")
    vf_learning_rate: float = _arg(1e-4, "learning rate of the value head")
    n_epochs: int = _arg(5, "PPO epochs per rollout")
    batch_size: int = _arg(64, "minibatch size in tokens (rounded to whole sequences)")
    clip_range: float = _arg(0.2, "PPO clip range")
    gamma: float = _arg(0.99, "discount factor")
    gae_lambda: float = _arg(0.95, "GAE lambda")
    ent_coef: float = _arg(0.0, "entropy bonus coefficient")
    vf_coef: float = _arg(0.5, "value loss coefficient")
    max_grad_norm: float = _arg(0.5, "gradient clipping norm")
    normalize_advantage: bool = _arg(False, "normalise advantages per minibatch (rescales reward vs the analytic KL term)")
    lora_rank: int = _arg(0, "train rank-r LoRA adapters (needs peft) instead of all weights; the reference is the same network with the adapters off (0: full fine-tuning)")
    # run
    iters: int = _arg(50, "PPO iterations (rollout + update)")
    seed: int = _arg(0, "random seed")
    out: str = _arg("runs/ppo_kl", "output directory: metrics.csv, checkpoint.zip, curves.png, SB3 logs")
    device: str = _arg("cpu", "torch device: cpu, cuda, cuda:1, ... (under torchrun each rank uses cuda:LOCAL_RANK)")
    dtype: str = _arg("float32", "compute dtype: bfloat16 runs the policy under autocast (float32 weights) and stores the frozen reference in bfloat16", choices=tuple(DTYPES))
    gradient_checkpointing: bool = _arg(False, "recompute the policy's layer activations in backward (less memory, one more forward)")
    eval_every: int = _arg(5, "evaluate on held-out prompts every N iterations (0: never)")
    eval_prompts: int = _arg(16, "held-out prompts per evaluation")
    save_every: int = _arg(5, "write the checkpoint every N iterations (and at the end)")
    resume: bool = _arg(False, "continue from the checkpoint in --out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    if get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.ppo_kl",
        description="PPO fine-tuning of a language model on IMDBContinuation-v0 with a KL penalty to the "
        "reference model (sampled or analytic KL in the reward, optional analytic KL gradient).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file whose keys mirror these flags (flags override it)")
    hints = get_type_hints(Args)
    for f in dataclasses.fields(Args):
        kind = _base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(_flag(f.name), type=kind, default=None, choices=f.metadata.get("choices"), help=f.metadata["help"])
    return parser


def load_config(path: Path) -> dict[str, Any]:
    """YAML keys (``kl_coef`` or ``kl-coef``) validated against the flags."""
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(Args)}
    config = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config: unknown keys {unknown} in {path}")
    return config


def parse_args(argv: list[str] | None = None) -> Args:
    """Defaults < YAML config < command-line flags; then validated."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    config_path = namespace.pop("config")
    values = load_config(config_path) if config_path else {}
    values.update({key: value for key, value in namespace.items() if value is not None})
    args = Args(**values)
    errors = validate(args)
    if errors:
        parser.error("; ".join(errors))
    return args


def validate(args: Args) -> list[str]:
    errors = []
    for name in ("max_prompt_tokens", "max_new_tokens", "n_envs", "iters", "n_epochs", "batch_size", "eval_prompts", "save_every"):
        if getattr(args, name) < 1:
            errors.append(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    try:
        check_kl_options(args.kl_reward, args.kl_loss, args.analytic_grad, args.kl_coef)
    except ValueError as error:
        errors.append(str(error))
    if args.target_kl is not None and args.target_kl <= 0:
        errors.append(f"--target-kl must be > 0, got {args.target_kl}")
    for name in ("eval_every", "lora_rank"):
        if getattr(args, name) < 0:
            errors.append(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if (error := device_error(args.device)) is not None:
        errors.append(error)
    return errors
