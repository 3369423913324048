"""A PPOKL's full training state into and out of the checkpoint format of ``agents.state.checkpoint``.

``save_ppokl`` refuses to write non-finite parameters or optimizer state (``NonFiniteStateError``),
so a diverged update never replaces the last good checkpoint. ``load_ppokl`` builds a fresh model
from the stored settings on the given env (which reloads the base model named in
``policy_kwargs``), checks that it is the same model (config hash, vocabulary) and that every
tensor fits, then assigns the typed counters, optimizer state and RNG states. Settings that are
not JSON (a callable learning-rate schedule, an optimizer class) are not stored and must be
passed again to ``load``. NLPO's masking policy (``PPOKL.masking_lm``, the policy as of its last
sync) is stored under ``masking_policy.``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from agents.options import ADDED_SETTINGS, UNSTORED_ARGUMENTS
from agents.state.checkpoint import EPISODE_BUFFERS, CheckpointError, CheckpointMeta, Counters, ModelIdentity, read_checkpoint, write_checkpoint


class NonFiniteStateError(FloatingPointError):
    """Parameters or optimizer state hold NaN or inf (the update diverged)."""


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """JSON-serialisable settings, and the names of those that are not (stored as absent)."""
    stored = {name: value for name, value in settings.items() if _is_json(value)}
    return stored, sorted(set(settings) - set(stored))


def _add_tensors(tensors: dict[str, torch.Tensor], aliases: dict[str, str], prefix: str, named: Mapping[str, torch.Tensor]) -> None:
    """Add ``named`` under ``prefix``; a tensor sharing storage with one already added becomes an alias."""
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype): k for k, t in tensors.items()}
    for name, tensor in named.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        if key in seen:
            aliases[prefix + name] = seen[key]
            continue
        seen[key] = prefix + name
        tensors[prefix + name] = tensor.cpu().contiguous()


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def _set_rng_state(tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any], path: Path) -> None:
    try:
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(name.startswith("rng.cuda.") for name in tensors))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
    except KeyError as error:
        raise CheckpointError(f"{path}: missing tensor {error}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as error:
        raise CheckpointError(f"{path}: field 'rng' is not a valid RNG state ({' '.join(str(error).split())})") from None


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding NaN or inf.

    A tensor's sum is finite when all its elements are (a NaN or inf element makes it NaN or inf),
    so one fast pass of sums screens every tensor; only a non-finite sum, which finite elements
    can also give by overflowing, is checked element by element. That is 16x faster than
    ``isfinite(t).all()`` on every tensor (0.05 s against 0.9 s for SmolLM2-135M's parameters and
    AdamW state on one CPU thread)."""
    floating = [(name, t) for name, t in named if t.is_floating_point()]
    if not floating:
        return []
    with torch.no_grad():
        sums = torch.stack([t.sum().float().cpu() for _, t in floating])
    if bool(torch.isfinite(sums).all()):
        return []
    return [name for (name, t), total in zip(floating, sums) if not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all())]


class PPOKLState(Protocol):
    """What of a PPOKL (``agents.algorithm.PPOKL``) its training state reads and restores; a
    Protocol, so this module needs no import of the algorithm, which imports it."""

    policy: Any  # agents.policy.CausalLMPolicy
    settings: dict[str, Any]
    kl_controller: Any
    masking_lm: torch.nn.Module | None
    action_space: Any
    num_timesteps: int
    n_iterations: int

    def make_kl_controller(self, beta: float) -> Any: ...

    def restore_masking_policy(self, state: dict[str, torch.Tensor]) -> None: ...


def check_finite(model: PPOKLState, when: str) -> None:
    """``NonFiniteStateError`` if the policy's parameters or the optimizer's state hold NaN/inf."""
    named = list(model.policy.named_parameters())
    for index, state in model.policy.optimizer.state_dict()["state"].items():
        named.extend((f"optimizer.{index}.{key}", value) for key, value in state.items() if torch.is_tensor(value))
    bad = non_finite(named)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteStateError(
            f"non-finite values in {len(bad)} tensors ({shown}) {when}: the update diverged; nothing of it was saved "
            "(the checkpoint keeps the last finite state): try a lower --learning-rate or --max-grad-norm"
        )


def config_sha256(config: Any) -> str:
    """SHA-256 of a Hugging Face config's settings (JSON, sorted keys), without the fields that name
    where or with which transformers version it was loaded."""
    settings = {key: value for key, value in config.to_dict().items() if not key.startswith("_") and key != "transformers_version"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: PPOKLState) -> ModelIdentity:
    fingerprints = getattr(model, "model_fingerprints", {})
    return ModelIdentity(
        model=str(model.policy.model_spec),
        config_sha256=config_sha256(model.policy.lm.config),
        vocab_size=int(model.action_space.n),
        policy_sha256=fingerprints.get("policy"),
        reference_sha256=fingerprints.get("reference"),
    )


def save_ppokl(model: PPOKLState, path: str | Path, run: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s full training state to ``path`` (``run``: the CLI's arguments, stored so that
    a resume can check them); ``NonFiniteStateError`` instead of writing NaN/inf."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    _add_tensors(tensors, aliases, "policy.", model.policy.state_dict())
    if getattr(model, "masking_lm", None) is not None:  # NLPO's masking policy (not re-derivable)
        _add_tensors(tensors, aliases, "masking_policy.", model.masking_lm.state_dict())
    optimizer = model.policy.optimizer.state_dict()
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer["state"].items():
        _add_tensors(tensors, aliases, f"optimizer.{index}.", {k: v for k, v in state.items() if torch.is_tensor(v)})
        optimizer_scalars[str(index)] = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    bad = non_finite(tensors.items())
    if bad:
        raise NonFiniteStateError(f"refusing to checkpoint non-finite values in {len(bad)} tensors ({', '.join(bad[:3])}, ...)")
    rng_tensors, rng_states = _rng_state()
    tensors.update(rng_tensors)
    settings, not_stored = _split_settings(model.settings)
    meta = CheckpointMeta(
        settings=settings,
        not_stored=not_stored,
        counters=Counters(**{name: getattr(model, name) for name in Counters.__dataclass_fields__}),
        episode_buffers={name: list(getattr(model, name) or []) for name in EPISODE_BUFFERS},
        kl_coef_value=model.kl_controller.value,
        optimizer={"param_groups": optimizer["param_groups"], "scalars": optimizer_scalars},
        aliases=aliases,
        rng=rng_states,
        identity=model_identity(model),
        run=dict(run) if run is not None else None,
    )
    write_checkpoint(path, tensors, meta)


def _named(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    named = {name: t for name, t in tensors.items() if name.startswith(prefix)}
    for alias, target in aliases.items():
        if alias.startswith(prefix):
            if target not in tensors:
                raise CheckpointError(f"{path}: field 'aliases.{alias}' names a missing tensor {target!r}")
            named[alias] = tensors[target]
    return {name[len(prefix) :]: t for name, t in named.items()}


def _fits(value: Any, default: Any) -> bool:
    """Whether a stored setting has the type of the constructor default it replaces."""
    if value is None or type(default) not in (bool, int, float, str):
        return True
    if type(default) is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is type(default)


def check_settings(cls: type[PPOKLState], settings: Mapping[str, Any], path: Path) -> None:
    """Every stored setting is a constructor argument, of the type of its default."""
    parameters = inspect.signature(cls.__init__).parameters
    for name, value in settings.items():
        if name not in parameters or name in UNSTORED_ARGUMENTS:
            raise CheckpointError(f"{path}: field 'settings.{name}' is not a setting of {cls.__name__}")
        if not _fits(value, parameters[name].default):
            kind = type(parameters[name].default).__name__
            raise CheckpointError(f"{path}: field 'settings.{name}' must be a {kind}, got {value!r}")


def _optimizer_state(model: PPOKLState, meta: CheckpointMeta, tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The optimizer's state dict, each tensor checked against its parameter's shape."""
    params = [p for group in model.policy.optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for name, tensor in _named(tensors, meta.aliases, "optimizer.", path).items():
        index_text, key = name.split(".", 1) if "." in name else (name, "")
        if not index_text.isdigit() or int(index_text) >= len(params):
            raise CheckpointError(f"{path}: tensor 'optimizer.{name}' names no parameter of the optimizer")
        index = int(index_text)
        if tensor.dim() and tensor.shape != params[index].shape:
            raise CheckpointError(
                f"{path}: tensor 'optimizer.{name}' has shape {tuple(tensor.shape)}, its parameter {tuple(params[index].shape)}"
            )
        per_param.setdefault(index, {})[key] = tensor
    for index, scalars in meta.optimizer["scalars"].items():
        per_param.setdefault(int(index), {}).update(scalars)
    return {"state": per_param, "param_groups": meta.optimizer["param_groups"]}


def load_ppokl(cls: type[PPOKLState], path: str | Path, env: Any, device: torch.device | str, **kwargs: Any) -> PPOKLState:
    """A ``cls`` on ``env`` in the exact training state saved at ``path``; ``kwargs`` override settings."""
    path = Path(path)
    meta, tensors = read_checkpoint(path)
    missing = sorted(set(meta.not_stored) - set(kwargs))
    if missing:
        raise CheckpointError(f"{path} could not store the settings {missing} (not JSON): pass them to load()")
    check_settings(cls, meta.settings, path)
    model = cls(env=env, device=device, **{**ADDED_SETTINGS, **meta.settings, **kwargs})
    if meta.identity is not None:
        built = model_identity(model)
        for name, stored in asdict(meta.identity).items():
            if name.endswith("_sha256") and name != "config_sha256" and stored is not None and getattr(built, name) != stored:
                which = "initial policy" if name == "policy_sha256" else "reference model"
                raise CheckpointError(
                    f"{path}: the weights of the {which} {built.model!r} differ from those the run was trained with "
                    f"(field 'identity.{name}'): the model changed on disk since; restore it or start a new --out"
                )
            if name != "model" and stored is not None and getattr(built, name) != stored:
                raise CheckpointError(
                    f"{path}: field 'identity.{name}' is {stored!r} but the model {built.model!r} built from its settings "
                    f"has {getattr(built, name)!r}: the checkpoint belongs to another model"
                )
    try:
        model.policy.load_state_dict(_named(tensors, meta.aliases, "policy.", path), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the policy built from its settings: {' '.join(str(error).split())}") from None
    masking_policy = _named(tensors, meta.aliases, "masking_policy.", path)
    if masking_policy:
        try:
            model.restore_masking_policy(masking_policy)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: its masking policy does not fit the policy built from its settings: {' '.join(str(error).split())}") from None
    optimizer_state = _optimizer_state(model, meta, tensors, path)
    try:
        model.policy.optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: field 'optimizer' does not fit the optimizer ({' '.join(str(error).split())})") from None
    for name, value in asdict(meta.counters).items():
        setattr(model, name, value)  # the fixed, typed fields of Counters only
    for name, values in meta.episode_buffers.items():
        setattr(model, name, deque(values, maxlen=model._stats_window_size))
    model.kl_controller = model.make_kl_controller(meta.kl_coef_value)
    _set_rng_state(tensors, meta.rng, path)
    return model
