"""The run's arguments: one dataclass (``Args``) from which the CLI flags (in groups), the YAML
config keys and PPOKL's constructor settings (``ppokl_settings``, which a checkpoint stores) are
all derived.

Importing this module loads no torch (``--help`` answers at once): the device check and the
checkpoint reader for ``--resume`` are imported when they are needed.

Defaults follow the seed's IMDB config where it applies (RL4LMs GPT-2 IMDB PPO: 10 envs,
64 prompt tokens, 48 new tokens, 5 epochs, batch 64, lr 1e-6, beta 0.1).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from agents.options import ADDED_SETTINGS, DTYPE_NAMES, KL_LOSSES, KL_REWARDS, REF_LOGITS_MODES, SAMPLERS, VALIDATED, option_errors


def _arg(default: Any, help: str, group: str, ppokl: str | None = None, **extra: Any) -> Any:
    """A field of ``Args``: its default, its help text, its CLI group and, for a setting of PPOKL,
    where it goes: ``ppokl`` names the constructor argument (``"policy_kwargs.KEY"`` for a key of
    ``policy_kwargs``)."""
    return field(default=default, metadata={"help": help, "group": group, "ppokl": ppokl, **extra})


def _asset(default: Any, help: str, **extra: Any) -> Any:
    return _arg(default, help, "assets (passed through to the env)", **extra)


def _kl(default: Any, help: str, **extra: Any) -> Any:
    return _arg(default, help, "KL handling", **extra)


def _mask(default: Any, help: str, **extra: Any) -> Any:
    return _arg(default, help, "NLPO action masks (agents.rollout.masking)", **extra)


def _ppo(default: Any, help: str, **extra: Any) -> Any:
    return _arg(default, help, "PPO", **extra)


def _run(default: Any, help: str, **extra: Any) -> Any:
    return _arg(default, help, "run", **extra)


@dataclass
class Args:
    """Everything a PPO-KL run needs; each field is a CLI flag (``--kl-coef``) and a YAML key."""

    model: str = _asset("smollm2-135m", "policy/reference LM: 'smollm2-135m' (embedded), a local path or a Hub id", ppokl="policy_kwargs.model")
    reward: str = _asset("vader", "reward model: 'vader' (embedded) or a text-classification model path/Hub id")
    positive_label: int = _asset(1, "index of the positive label of a classifier reward")
    dataset: str = _asset("bundled", "prompts: 'bundled', 'stanfordnlp/imdb', or a local csv/json/parquet with a text column")
    max_prompt_tokens: int = _asset(64, "prompt length in tokens (truncated from the left)")
    max_new_tokens: int = _asset(48, "tokens generated per episode")
    n_envs: int = _asset(10, "prompts per rollout (batched env size)")
    kl_coef: float = _kl(0.1, "beta: weight of the KL penalty (initial value with --kl-target)", ppokl="kl_coef")
    kl_target: float | None = _kl(None, "target sequence KL for the adaptive controller (omit for a fixed beta)", ppokl="kl_target")
    kl_horizon: int = _kl(10_000, "horizon (in episodes) of the adaptive KL controller", ppokl="kl_horizon")
    kl_reward: str = _kl("k1", "per-token KL in the reward", choices=KL_REWARDS, ppokl="kl_reward")
    analytic_grad: bool = _kl(False, "add the exact per-position KL to the loss and drop the current token's KL from its advantage", ppokl="analytic_grad")
    kl_loss: str | None = _kl(None, "GRPO-style autodiff KL loss, for study", choices=KL_LOSSES, ppokl="kl_loss")
    ref_logits: str = _kl("store", "reference logits for the analytic KL: 'store' [N, T, V] from the rollout, 'recompute' per minibatch (no storage, one extra reference forward), or 'hidden' (store pi_ref's [N, T, d] hidden states; the update computes the KL fused, with no [b, T, V] logits)", choices=REF_LOGITS_MODES, ppokl="ref_logits")
    mask_top_k: int | None = _mask(None, "NLPO: sample only the top-k tokens of the masking policy (a frozen, periodically synced copy of the policy)", ppokl="mask_top_k")
    mask_top_p: float | None = _mask(None, "NLPO: sample only the top-p nucleus of the masking policy (RL4LMs: 0.9)", ppokl="mask_top_p")
    mask_sync_every: int = _mask(5, "NLPO: copy the policy into the masking policy every N iterations", ppokl="mask_sync_every")
    learning_rate: float = _ppo(1e-6, "learning rate of the language model", ppokl="learning_rate")
    vf_learning_rate: float = _ppo(1e-4, "learning rate of the value head", ppokl="policy_kwargs.vf_learning_rate")
    n_epochs: int = _ppo(5, "PPO epochs per rollout", ppokl="n_epochs")
    batch_size: int = _ppo(64, "minibatch size in tokens (rounded to whole sequences)", ppokl="batch_size")
    clip_range: float = _ppo(0.2, "PPO clip range", ppokl="clip_range")
    gamma: float = _ppo(0.99, "discount factor", ppokl="gamma")
    gae_lambda: float = _ppo(0.95, "GAE lambda", ppokl="gae_lambda")
    ent_coef: float = _ppo(0.0, "entropy bonus coefficient", ppokl="ent_coef")
    vf_coef: float = _ppo(0.5, "value loss coefficient", ppokl="vf_coef")
    max_grad_norm: float = _ppo(0.5, "gradient clipping norm", ppokl="max_grad_norm")
    normalize_advantage: bool = _ppo(False, "normalise advantages per minibatch (rescales reward vs the analytic KL term)", ppokl="normalize_advantage")
    lora_rank: int = _ppo(0, "train rank-r LoRA adapters (needs peft) instead of all weights; the reference is the same network with the adapters off (0: full fine-tuning)", ppokl="policy_kwargs.lora_rank")
    iters: int = _run(50, "PPO iterations (rollout + update)")
    seed: int = _run(0, "random seed", ppokl="seed")
    out: str = _run("runs/ppo_kl", "output directory: metrics.csv, checkpoint.safetensors, policy/, curves.png, SB3 logs")
    device: str = _run("cpu", "torch device: cpu, cuda, cuda:N or mps (under torchrun each rank uses cuda:LOCAL_RANK)")
    dtype: str = _run("float32", "compute dtype: bfloat16 runs the policy under autocast (float32 weights) and stores the frozen reference in bfloat16", choices=DTYPE_NAMES, ppokl="policy_kwargs.dtype")
    sampler: str = _run("inverse-cdf", "how the rollout draws tokens: 'inverse-cdf' (one uniform per row, exact in float64) or 'multinomial' (torch.multinomial: HF generate's tokens for the same seed, and those of runs made before the inverse CDF)", choices=SAMPLERS, ppokl="sampler")
    cast_lm_head_to_fp32: bool = _run(False, "run the output layer of the policy and the reference in float32 under --dtype bfloat16 (TRL's cast_lm_head_to_fp32): bfloat16 logits are the main error of the KL (docs/benchmarks.md)", ppokl="policy_kwargs.cast_lm_head_to_fp32")
    gradient_checkpointing: bool = _run(False, "recompute the policy's layer activations in backward (less memory, one more forward)", ppokl="policy_kwargs.gradient_checkpointing")
    eval_every: int = _run(5, "evaluate on held-out prompts every N iterations (0: never)")
    eval_prompts: int = _run(16, "held-out prompts per evaluation")
    save_every: int = _run(1, "write the checkpoint every N iterations (and at the end)")
    resume: bool = _run(False, "continue the run in --out from its checkpoint, with its args.json (a run stopped before its first checkpoint restarts)")


# Flags a resumed run may change; any other flag given with --resume must equal the run's args.json.
RESUMABLE_CHANGES = ("iters", "resume", "out", "device", "save_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    if get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint


# Fields renamed since earlier releases: the old name is refused with the new one (flags, YAML),
# and read as the new one from the args.json or checkpoint of a run made before the change.
RENAMED = {"target_kl": "kl_target"}  # the adaptive controller's target (PPOKL's target_kl is SB3's early stop)


def _renamed_hint(name: str) -> str:
    """``"; --target-kl is now --kl-target"`` for a renamed flag or key, else ``""``."""
    key = name.removeprefix("--").replace("-", "_")
    if key not in RENAMED:
        return ""
    return f"; {name} is now {_flag(RENAMED[key]) if name.startswith('--') else RENAMED[key]}"


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """Exit 2 with one line naming the flag (argparse's default also prints the usage block),
        with the closest flags for an unrecognised one (``--kl-cof``: did you mean --kl-coef?)."""
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments: "):
            return ""
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        given = [word.split("=")[0] for word in message.removeprefix("unrecognized arguments: ").split() if word.startswith("--")]
        renamed = "".join(_renamed_hint(word) for word in given)
        if renamed:
            return renamed
        close = [match for word in given for match in difflib.get_close_matches(word, known, n=1, cutoff=0.6)]
        return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""


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
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Args):
        group = groups.get(f.metadata["group"]) or groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        # default=None marks "not given" so that YAML and args.json can be layered under the flags
        kind, text = _base_type(hints[f.name]), f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(_flag(f.name), type=kind, default=None, choices=f.metadata.get("choices"), help=text)
    return parser


def ppokl_settings(args: Args) -> dict[str, Any]:
    """The ``PPOKL`` constructor settings of a run (a checkpoint stores the same, as JSON), from the
    fields of ``Args`` that name a PPOKL argument."""
    settings: dict[str, Any] = {}
    policy_kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(Args):
        target = f.metadata["ppokl"]
        if target is None:
            continue
        if target.startswith("policy_kwargs."):
            policy_kwargs[target.removeprefix("policy_kwargs.")] = getattr(args, f.name)
        else:
            settings[target] = getattr(args, f.name)
    return {**settings, "policy_kwargs": policy_kwargs}


def _flag_of_setting(setting: str) -> str:
    """The CLI flag of the PPOKL argument ``setting`` (``policy_kwargs.lora_rank`` -> ``--lora-rank``)."""
    return next((_flag(f.name) for f in dataclasses.fields(Args) if f.metadata["ppokl"] in (setting, f"policy_kwargs.{setting}")), setting)


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
    except RecursionError:
        raise _config_error(f"{path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise _config_error(f"{path} must hold a mapping of flag names to values, not a {type(data).__name__}")
    config = {str(key).replace("-", "_"): value for key, value in data.items()}
    hints = get_type_hints(Args)
    unknown = sorted(set(config) - set(hints))
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(key, list(hints), n=1, cutoff=0.6)]
        hint = "".join(_renamed_hint(key) for key in unknown) or (f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else "")
        raise _config_error(f"unknown keys {unknown} in {path}{hint}")
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
        from agents.state.checkpoint import CheckpointError, read_meta  # loads torch: only for --resume

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
    saved = with_current_names(saved)
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


def with_current_names(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's arguments with the fields of ``RENAMED`` under their current names, and the
    fields of ``ADDED_SETTINGS`` it lacks with the value such runs used."""
    return {**ADDED_SETTINGS, **{RENAMED.get(key, key): value for key, value in saved.items()}}


def differing_settings(args: Args, run: dict[str, Any]) -> list[str]:
    """The fields (other than ``RESUMABLE_CHANGES``) where ``args`` and a checkpoint's copy of the
    run's arguments ``run`` differ, as ``name: args value vs checkpoint value``."""
    current, run = dataclasses.asdict(args), with_current_names(run)
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
    for name in ("max_prompt_tokens", "max_new_tokens", "n_envs", "iters", "n_epochs", "batch_size", "eval_prompts", "save_every"):
        if getattr(args, name) < 1:
            errors.append(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("learning_rate", "vf_learning_rate", "clip_range", "max_grad_norm"):
        if not getattr(args, name) > 0:
            errors.append(f"{_flag(name)} must be > 0, got {getattr(args, name)}")
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        if f.metadata["ppokl"] in VALIDATED:
            continue  # checked by option_errors below
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{_flag(f.name)} must be a finite number, got {value}")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            errors.append(f"{_flag(name)} must be in [0, 1], got {getattr(args, name)}")
    for name in ("ent_coef", "vf_coef", "eval_every", "positive_label"):
        if not getattr(args, name) >= 0:
            errors.append(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    settings = ppokl_settings(args)
    policy_kwargs = settings.pop("policy_kwargs")
    errors.extend(option_errors({**settings, **policy_kwargs}, _flag_of_setting))
    if args.lora_rank < 0:
        errors.append(f"--lora-rank must be >= 0, got {args.lora_rank}")
    from agents.device import device_error  # loads torch: after --help and the checks above

    errors.extend(error for error in (device_error(args.device), _out_error(args.out)) if error)
    return errors
