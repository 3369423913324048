"""The run's arguments: one dataclass mirrored by the CLI flags and the YAML config keys.

Defaults follow the seed's IMDB config where it applies (RL4LMs GPT-2 IMDB PPO: 10 envs,
64 prompt tokens, 48 new tokens, 5 epochs, batch 64, lr 1e-6, beta 0.1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from agents.advantages import KL_REWARDS
from agents.algorithm import KL_LOSSES, check_kl_options
from agents.checkpoint import CheckpointError, read_meta
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
    ref_logits: str = _arg("store", "reference logits for the analytic KL: 'store' [N, T, V] from the rollout, 'recompute' per minibatch (no storage, one extra reference forward), or 'hidden' (store pi_ref's [N, T, d] hidden states; the update computes the KL fused, with no [b, T, V] logits)", choices=REF_LOGITS_MODES)
    # NLPO action masks (agents.masking)
    mask_top_k: int | None = _arg(None, "NLPO: sample only the top-k tokens of the masking policy (a frozen, periodically synced copy of the policy)")
    mask_top_p: float | None = _arg(None, "NLPO: sample only the top-p nucleus of the masking policy (RL4LMs: 0.9)")
    mask_sync_every: int = _arg(5, "NLPO: copy the policy into the masking policy every N iterations")
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
    out: str = _arg("runs/ppo_kl", "output directory: metrics.csv, checkpoint.safetensors, policy/, curves.png, SB3 logs")
    device: str = _arg("cpu", "torch device: cpu, cuda, cuda:N or mps (under torchrun each rank uses cuda:LOCAL_RANK)")
    dtype: str = _arg("float32", "compute dtype: bfloat16 runs the policy under autocast (float32 weights) and stores the frozen reference in bfloat16", choices=tuple(DTYPES))
    cast_lm_head_to_fp32: bool = _arg(False, "run the output layer of the policy and the reference in float32 under --dtype bfloat16 (TRL's cast_lm_head_to_fp32): bfloat16 logits are the main error of the KL (docs/benchmarks.md)")
    gradient_checkpointing: bool = _arg(False, "recompute the policy's layer activations in backward (less memory, one more forward)")
    eval_every: int = _arg(5, "evaluate on held-out prompts every N iterations (0: never)")
    eval_prompts: int = _arg(16, "held-out prompts per evaluation")
    save_every: int = _arg(1, "write the checkpoint every N iterations (and at the end)")
    resume: bool = _arg(False, "continue the run in --out from its checkpoint, with its args.json (a run stopped before its first checkpoint restarts)")


# Flags a resumed run may change; any other flag given with --resume must equal the run's args.json.
RESUMABLE_CHANGES = ("iters", "resume", "out", "device", "save_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    if get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """Exit 2 with one line naming the flag (argparse's default also prints the usage block)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_error(message: str) -> ValueError:
    return ValueError(f"--config: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="python -m agents.ppo_kl",
        description="PPO fine-tuning of a language model on IMDBContinuation-v0 with a KL penalty to the "
        "reference model (sampled or analytic KL in the reward, optional analytic KL gradient).",
    )
    parser.add_argument("--config", type=Path, help="YAML file whose keys mirror these flags (flags override it)")
    hints = get_type_hints(Args)
    for f in dataclasses.fields(Args):
        # default=None marks "not given" so that YAML and args.json can be layered under the flags
        kind, text = _base_type(hints[f.name]), f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=None, choices=f.metadata.get("choices"), help=text)
    return parser


def _typed(name: str, value: Any, hint: Any, source: str = "--config") -> Any:
    """A YAML or JSON value as the field's type (YAML reads 1e-5 as a string: numbers in strings are
    parsed); errors name ``source``."""
    kind = _base_type(hint)
    if value is None and kind is not hint:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind in (int, float) and not isinstance(value, bool):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise ValueError(f"{source}: {name} must be {expected}, got {value!r}")


def load_config(path: Path) -> dict[str, Any]:
    """YAML keys (``kl_coef`` or ``kl-coef``) validated against the flags and typed like them."""
    if not path.is_file():
        raise _config_error(f"no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise _config_error(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise _config_error(f"{path} must hold a mapping of flag names to values, not a {type(data).__name__}")
    config = {str(key).replace("-", "_"): value for key, value in data.items()}
    hints = get_type_hints(Args)
    unknown = sorted(set(config) - set(hints))
    if unknown:
        raise _config_error(f"unknown keys {unknown} in {path}")
    return {name: _typed(name, value, hints[name]) for name, value in config.items()}


def _saved_args(out: Path) -> tuple[dict[str, Any], str] | None:
    """The arguments of the run in ``out`` and where they come from: its args.json, or the copy in
    its checkpoint if args.json is gone; every value typed like its field. None if neither exists."""
    hints = get_type_hints(Args)
    saved_path, checkpoint = out / "args.json", out / "checkpoint.safetensors"
    if saved_path.is_file():
        source = str(saved_path)
        try:
            saved = json.loads(saved_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{saved_path} is not valid JSON ({error})") from None
    elif checkpoint.is_file():
        source = f"{checkpoint} (args.json is missing)"
        try:
            saved = read_meta(checkpoint).run
        except CheckpointError:
            return None  # reported when the checkpoint is loaded
        if saved is None:
            raise ValueError(f"--resume: {saved_path} is missing and {checkpoint} holds no copy of the run's arguments")
    else:
        return None
    if not isinstance(saved, dict):
        raise ValueError(f"{source} must hold a JSON object of the run's arguments, not a {type(saved).__name__}")
    unknown = sorted(set(saved) - set(hints))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}")
    return {key: _typed(key, value, hints[key], source) for key, value in saved.items()}, source


def _resumed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` layered over the saved arguments of the run in --out; a contradiction is an error."""
    found = _saved_args(Path(values.get("out", Args.out)))
    if found is None:
        return values  # nothing to resume yet: the run restarts (see agents.ppo_kl)
    saved, source = found
    conflicts = [
        f"{_flag(key)} {values[key]!r} (the run has {saved[key]!r})"
        for key in values
        if key not in RESUMABLE_CHANGES and key in saved and values[key] != saved[key]
    ]
    if conflicts:
        raise ValueError(
            f"--resume: {', '.join(conflicts)} contradict {source}; a resumed run keeps its settings "
            f"(only {', '.join(map(_flag, RESUMABLE_CHANGES))} may change): drop them or start a new --out"
        )
    return {**saved, **values}


def differing_settings(args: Args, run: dict[str, Any]) -> list[str]:
    """The fields (other than ``RESUMABLE_CHANGES``) where ``args`` and a checkpoint's copy of the
    run's arguments ``run`` differ, as ``name: args value vs checkpoint value``."""
    current = dataclasses.asdict(args)
    return [
        f"{name} {current.get(name)!r} vs {run.get(name)!r}"
        for name in sorted(set(current) | set(run))
        if name not in RESUMABLE_CHANGES and current.get(name) != run.get(name)
    ]


def command_line(args: Args) -> list[str]:
    """The flags that reproduce ``args`` (those that differ from the defaults; never --resume)."""
    flags: list[str] = []
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        if f.name == "resume" or value == f.default:
            continue
        if isinstance(value, bool):
            flags.append(_flag(f.name) if value else f"--no-{f.name.replace('_', '-')}")
        else:
            flags += [_flag(f.name), str(value)]
    return flags


def parse_args(argv: list[str] | None = None) -> Args:
    """Defaults < YAML config < command-line flags (with --resume: < the run's args.json < ...);
    then validated. Any error exits 2 with one line naming the flag."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    config_path = namespace.pop("config")
    try:
        values = load_config(config_path) if config_path else {}
        values.update({key: value for key, value in namespace.items() if value is not None})
        if values.get("resume"):
            values = _resumed(values)
    except ValueError as error:
        parser.error(str(error))
    args = Args(**values)
    errors = validate(args)
    if errors:
        parser.error("; ".join(errors))
    return args


def _out_error(out: str) -> str | None:
    for path in (Path(out), *Path(out).parents):
        if path.exists():
            return None if path.is_dir() else f"--out {out}: {path} is a file, not a directory"
    return None


def validate(args: Args) -> list[str]:
    """Every out-of-range flag, checked before any model is loaded."""
    errors = []
    for name in ("max_prompt_tokens", "max_new_tokens", "n_envs", "iters", "n_epochs", "batch_size", "eval_prompts", "save_every", "kl_horizon", "mask_sync_every"):
        if getattr(args, name) < 1:
            errors.append(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("learning_rate", "vf_learning_rate", "clip_range", "max_grad_norm"):
        if not getattr(args, name) > 0:
            errors.append(f"{_flag(name)} must be > 0, got {getattr(args, name)}")
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{_flag(f.name)} must be a finite number, got {value}")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            errors.append(f"{_flag(name)} must be in [0, 1], got {getattr(args, name)}")
    for name in ("ent_coef", "vf_coef", "eval_every", "positive_label"):
        if not getattr(args, name) >= 0:
            errors.append(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    try:
        check_kl_options(args.kl_reward, args.kl_loss, args.analytic_grad, args.kl_coef)
    except ValueError as error:
        errors.append(str(error))
    if args.target_kl is not None and not args.target_kl > 0:
        errors.append(f"--target-kl must be > 0, got {args.target_kl}")
    if args.mask_top_k is not None and args.mask_top_k < 1:
        errors.append(f"--mask-top-k must be >= 1, got {args.mask_top_k}")
    if args.mask_top_p is not None and not 0 < args.mask_top_p <= 1:
        errors.append(f"--mask-top-p must be in (0, 1], got {args.mask_top_p}")
    if args.lora_rank < 0:
        errors.append(f"--lora-rank must be >= 0, got {args.lora_rank}")
    errors.extend(error for error in (device_error(args.device), _out_error(args.out)) if error)
    return errors
