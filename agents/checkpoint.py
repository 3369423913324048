"""PPOKL's checkpoint format: one safetensors file, nothing that is unpickled on load.

The file holds every tensor needed to continue training (the policy's weights, the optimizer's
state tensors, torch's RNG state) and, in the safetensors header's metadata under ``"ppokl"``, one
JSON document with the rest: the constructor settings, SB3's counters (``num_timesteps``,
``_n_updates``, ...), ``n_iterations``, the KL controller's current beta, the optimizer's
param groups and the RNG states of numpy and python. Tensors that share storage (tied embeddings)
are stored once; ``aliases`` maps the other names to the stored one.

Loading builds a fresh ``PPOKL`` from the settings on the given env (which reloads the base model
named in ``policy_kwargs``), then copies the tensors and counters in. Settings that are not JSON
(a callable learning-rate schedule, an optimizer class) are not stored and must be passed again
to ``load``. NLPO's masking policy (``PPOKL.masking_lm``, the policy as of its last sync) is stored
under ``masking_policy.``. A stable-baselines3 zip (whose ``data`` member is pickled and can run code when
loaded) is refused.
"""
from __future__ import annotations

import json
import random
import zipfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from agents.algorithm import PPOKL
    from agents.vec_env import LMGymVecEnv

FORMAT = "ppokl-checkpoint/1"
META_KEY = "ppokl"
# SB3 attributes that change during training and are needed to continue it exactly.
COUNTERS = ("num_timesteps", "_n_updates", "n_iterations", "_episode_num", "_current_progress_remaining", "rollout_stats")
EPISODE_BUFFERS = ("ep_info_buffer", "ep_success_buffer")  # SB3's windows behind rollout/ep_rew_mean


class CheckpointError(ValueError):
    """A file that is not a PPOKL checkpoint, or one that does not fit the model being loaded."""


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


def _set_rng_state(tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(name.startswith("rng.cuda.") for name in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_ppokl(model: PPOKL, path: str | Path) -> None:
    """Write ``model``'s full training state to ``path`` (see the module docstring)."""
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
    rng_tensors, rng_states = _rng_state()
    tensors.update(rng_tensors)
    settings, not_stored = _split_settings(model.settings)
    meta = {
        "format": FORMAT,
        "settings": settings,
        "not_stored": not_stored,
        "counters": {name: getattr(model, name) for name in COUNTERS},
        "episode_buffers": {name: list(getattr(model, name) or []) for name in EPISODE_BUFFERS},
        "kl_coef_value": model.kl_controller.value,
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": optimizer_scalars},
        "aliases": aliases,
        "rng": rng_states,
    }
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a PPOKL checkpoint; ``CheckpointError`` for anything else.

    Only the safetensors reader touches the file: a pickled checkpoint is never deserialised.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a zip file (stable-baselines3's format, whose 'data' member is a pickle that can run "
            "arbitrary code when loaded): PPOKL reads only its own safetensors checkpoints and refuses it"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a safetensors file ({error})") from None
    try:
        meta = json.loads(metadata[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is a safetensors file but not a PPOKL checkpoint (no '{META_KEY}' metadata)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta, tensors


def _named(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str], prefix: str) -> dict[str, torch.Tensor]:
    named = {name: t for name, t in tensors.items() if name.startswith(prefix)}
    named.update({alias: tensors[target] for alias, target in aliases.items() if alias.startswith(prefix)})
    return {name[len(prefix) :]: t for name, t in named.items()}


def load_ppokl(cls: type[PPOKL], path: str | Path, env: LMGymVecEnv, device: torch.device | str, **kwargs: Any) -> PPOKL:
    """A ``cls`` on ``env`` in the exact training state saved at ``path``; ``kwargs`` override settings."""
    meta, tensors = read_checkpoint(path)
    missing = sorted(set(meta["not_stored"]) - set(kwargs))
    if missing:
        raise CheckpointError(f"{path} could not store the settings {missing} (not JSON): pass them to load()")
    settings = {**meta["settings"], **kwargs}
    model = cls(env=env, device=device, **settings)
    aliases = meta["aliases"]
    try:
        model.policy.load_state_dict(_named(tensors, aliases, "policy."), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the policy built from its settings: {error}") from None
    masking_policy = _named(tensors, aliases, "masking_policy.")
    if masking_policy:
        try:
            model.restore_masking_policy(masking_policy)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: its masking policy does not fit the policy built from its settings: {error}") from None
    per_param: dict[int, dict[str, Any]] = {}
    for name, tensor in _named(tensors, aliases, "optimizer.").items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = tensor
    for index, scalars in meta["optimizer"]["scalars"].items():
        per_param.setdefault(int(index), {}).update(scalars)
    model.policy.optimizer.load_state_dict({"state": per_param, "param_groups": meta["optimizer"]["param_groups"]})
    for name, value in meta["counters"].items():
        setattr(model, name, value)
    for name, values in meta["episode_buffers"].items():
        setattr(model, name, deque(values, maxlen=model._stats_window_size))
    model.kl_controller = model.make_kl_controller(meta["kl_coef_value"])
    _set_rng_state(tensors, meta["rng"])
    return model
