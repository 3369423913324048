"""PPOKL's checkpoint format: one safetensors file, nothing that is unpickled on load.

The file holds every tensor needed to continue training (the policy's weights, the optimizer's
state tensors, torch's RNG state) and, in the safetensors header's metadata under ``"ppokl"``, one
JSON document with the rest, parsed into a ``CheckpointMeta`` whose fields are typed and range
checked: the constructor settings, SB3's counters (``num_timesteps``, ``_n_updates``, ...),
``n_iterations``, the KL controller's current beta, the optimizer's param groups, the RNG states
of numpy and python, the identity of the model the policy was built from (name, config hash,
vocabulary) and, for a run of ``python -m agents.ppo_kl``, the run's arguments. Tensors that share
storage (tied embeddings) are stored once; ``aliases`` maps the other names to the stored one.

This module knows only the format; ``agents.state.training_state`` moves a ``PPOKL`` into and out of
it. A stable-baselines3 zip (whose ``data`` member is pickled and can run code when loaded) is
refused. A malformed file is a ``CheckpointError`` of one line naming the file and the field.

To add a field: add it to ``CheckpointMeta`` (with a default, so older files still parse) and a
line to ``_FIELDS``.
"""
from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "ppokl-checkpoint/1"
META_KEY = "ppokl"
EPISODE_BUFFERS = ("ep_info_buffer", "ep_success_buffer")  # SB3's windows behind rollout/ep_rew_mean
# The largest counter accepted: beyond 2**53 a JSON number is no longer an exact integer.
MAX_COUNT = 2**53


class CheckpointError(ValueError):
    """A file that is not a PPOKL checkpoint, or one that does not fit the model being loaded."""


@dataclass(frozen=True)
class Counters:
    """SB3's attributes that change during training and are needed to continue it exactly
    (JSON keys: the attribute names)."""

    num_timesteps: int
    _n_updates: int
    n_iterations: int
    _episode_num: int
    _current_progress_remaining: float
    rollout_stats: dict[str, float]


COUNTERS = tuple(f.name for f in fields(Counters))


@dataclass(frozen=True)
class ModelIdentity:
    """What the policy was built from: a checkpoint only resumes on the same model and vocabulary."""

    model: str
    config_sha256: str
    vocab_size: int
    # agents.fingerprint of the initial policy's and the reference model's weights (None: not recorded)
    policy_sha256: str | None = None
    reference_sha256: str | None = None


@dataclass(frozen=True)
class CheckpointMeta:
    """The parsed JSON metadata of a checkpoint (see the module docstring)."""

    settings: dict[str, Any]
    not_stored: list[str]
    counters: Counters
    episode_buffers: dict[str, list[dict[str, Any]]]
    kl_coef_value: float
    optimizer: dict[str, Any]
    aliases: dict[str, str]
    rng: dict[str, list[Any]]
    identity: ModelIdentity | None = None
    run: dict[str, Any] | None = None  # the run's arguments (args.json) when written by the CLI
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# ---------------------------------------------------------------- parsing


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Parser:
    """Type and range checks for one file; every failure names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, name: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: field '{name}' {message}")

    def get(self, raw: Mapping[str, Any], key: str, prefix: str = "") -> Any:
        if key not in raw:
            raise CheckpointError(f"{self.path}: missing field '{prefix}{key}'")
        return raw[key]

    def mapping(self, value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a JSON object, got {type(value).__name__}")
        return value

    def exact_keys(self, raw: dict[str, Any], keys: tuple[str, ...], name: str) -> None:
        extra = sorted(set(raw) - set(keys))
        if extra:
            raise self.fail(name, f"has unknown keys {extra}")

    def count(self, value: Any, name: str) -> int:
        if not _is_int(value) or not 0 <= value <= MAX_COUNT:
            raise self.fail(name, f"must be an integer in [0, 2**53], got {value!r}")
        return value

    def number(self, value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> float:
        if not _is_number(value) or not low <= value <= high:
            raise self.fail(name, f"must be a finite number in [{low}, {high}], got {value!r}")
        return float(value)

    def string(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {value!r}")
        return value

    def string_list(self, value: Any, name: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a list of strings, got {value!r}")
        return value

    def counters(self, value: Any, name: str) -> Counters:
        raw = self.mapping(value, name)
        self.exact_keys(raw, COUNTERS, name)
        stats = self.mapping(self.get(raw, "rollout_stats", f"{name}."), f"{name}.rollout_stats")
        for key, stat in stats.items():
            if not isinstance(stat, (int, float)) or isinstance(stat, bool):  # NaN statistics are legitimate
                raise self.fail(f"{name}.rollout_stats.{key}", f"must be a number, got {stat!r}")
        return Counters(
            num_timesteps=self.count(self.get(raw, "num_timesteps", f"{name}."), f"{name}.num_timesteps"),
            _n_updates=self.count(self.get(raw, "_n_updates", f"{name}."), f"{name}._n_updates"),
            n_iterations=self.count(self.get(raw, "n_iterations", f"{name}."), f"{name}.n_iterations"),
            _episode_num=self.count(self.get(raw, "_episode_num", f"{name}."), f"{name}._episode_num"),
            _current_progress_remaining=self.number(
                self.get(raw, "_current_progress_remaining", f"{name}."), f"{name}._current_progress_remaining", -1.0, 1.0
            ),
            rollout_stats={key: float(stat) for key, stat in stats.items()},
        )

    def episode_buffers(self, value: Any, name: str) -> dict[str, list[dict[str, Any]]]:
        raw = self.mapping(value, name)
        self.exact_keys(raw, EPISODE_BUFFERS, name)
        for key, entries in raw.items():
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise self.fail(f"{name}.{key}", "must be a list of JSON objects")
        return raw

    def optimizer(self, value: Any, name: str) -> dict[str, Any]:
        raw = self.mapping(value, name)
        self.exact_keys(raw, ("param_groups", "scalars"), name)
        groups = self.get(raw, "param_groups", f"{name}.")
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise self.fail(f"{name}.param_groups", "must be a list of objects with a 'params' list")
        scalars = self.mapping(self.get(raw, "scalars", f"{name}."), f"{name}.scalars")
        for index, entry in scalars.items():
            if not index.isdigit() or not isinstance(entry, dict):
                raise self.fail(f"{name}.scalars.{index}", "must map a parameter index to a JSON object")
        return raw

    def aliases(self, value: Any, name: str) -> dict[str, str]:
        raw = self.mapping(value, name)
        if not all(isinstance(v, str) for v in raw.values()):
            raise self.fail(name, "must map tensor names to tensor names")
        return raw

    def rng(self, value: Any, name: str) -> dict[str, list[Any]]:
        raw = self.mapping(value, name)
        self.exact_keys(raw, ("numpy", "python"), name)
        for key, length in (("numpy", 5), ("python", 3)):
            state = self.get(raw, key, f"{name}.")
            if not isinstance(state, list) or len(state) != length:
                raise self.fail(f"{name}.{key}", f"must be a list of {length} items")
        # numpy's MT19937: (name, 624 32-bit keys, position in [0, 624], has_gauss, cached gaussian)
        kind, keys, pos, has_gauss, cached = raw["numpy"]
        words = isinstance(keys, list) and len(keys) == 624 and all(_is_int(k) and 0 <= k < 2**32 for k in keys)
        if kind != "MT19937" or not words or not (_is_int(pos) and 0 <= pos <= 624) or has_gauss not in (0, 1) or not _is_number(cached):
            raise self.fail(f"{name}.numpy", "must be an MT19937 state: ('MT19937', 624 keys < 2**32, position in [0, 624], 0 or 1, a number)")
        # python's random: (version, 624 32-bit words + a position in [0, 624], gauss_next or None)
        version, internal, gauss_next = raw["python"]
        if not (
            _is_int(version)
            and isinstance(internal, list)
            and len(internal) == 625
            and all(_is_int(w) and 0 <= w < 2**32 for w in internal[:624])
            and _is_int(internal[624])
            and 0 <= internal[624] <= 624
            and (gauss_next is None or _is_number(gauss_next))
        ):
            raise self.fail(f"{name}.python", "must be a state of python's random: (version, 625 integers, None or a number)")
        return raw

    def identity(self, value: Any, name: str) -> ModelIdentity | None:
        if value is None:
            return None
        raw = self.mapping(value, name)
        self.exact_keys(raw, tuple(f.name for f in fields(ModelIdentity)), name)
        return ModelIdentity(
            model=self.string(self.get(raw, "model", f"{name}."), f"{name}.model"),
            config_sha256=self.string(self.get(raw, "config_sha256", f"{name}."), f"{name}.config_sha256"),
            vocab_size=self.count(self.get(raw, "vocab_size", f"{name}."), f"{name}.vocab_size"),
            policy_sha256=self.optional_digest(raw.get("policy_sha256"), f"{name}.policy_sha256"),
            reference_sha256=self.optional_digest(raw.get("reference_sha256"), f"{name}.reference_sha256"),
        )

    def optional_digest(self, value: Any, name: str) -> str | None:
        if value is not None and (not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise self.fail(name, f"must be 64 hexadecimal characters, got {value!r}")
        return value

    def optional_mapping(self, value: Any, name: str) -> dict[str, Any] | None:
        return None if value is None else self.mapping(value, name)


# field -> how to parse it; fields with a default in CheckpointMeta may be absent from the file
_FIELDS: dict[str, Callable[[_Parser, Any, str], Any]] = {
    "format": _Parser.string,
    "settings": _Parser.mapping,
    "not_stored": _Parser.string_list,
    "counters": _Parser.counters,
    "episode_buffers": _Parser.episode_buffers,
    "kl_coef_value": lambda p, v, n: p.number(v, n, 0.0),
    "optimizer": _Parser.optimizer,
    "aliases": _Parser.aliases,
    "rng": _Parser.rng,
    "identity": _Parser.identity,
    "run": _Parser.optional_mapping,
}
assert set(_FIELDS) == {f.name for f in fields(CheckpointMeta)}


def parse_meta(raw: Any, path: Path) -> CheckpointMeta:
    """The typed metadata of ``path``; ``CheckpointError`` naming the field for anything malformed."""
    parser = _Parser(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: the '{META_KEY}' metadata must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {raw.get('format')!r}; this version reads {FORMAT!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {unknown} (written by a newer version?)")
    defaults = {f.name for f in fields(CheckpointMeta) if f.default is not MISSING}
    values = {}
    for name, parse in _FIELDS.items():
        if name not in raw and name in defaults:
            continue
        values[name] = parse(parser, parser.get(raw, name), name)
    return CheckpointMeta(**values)


# ---------------------------------------------------------------- reading and writing


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` (not atomically: see ``agents.cli.run_dir.atomic_write``)."""
    save_file(dict(tensors), str(path), metadata={META_KEY: meta.to_json()})


def _open(path: Path, load_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a file")
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
            tensors = {name: f.get_tensor(name) for name in f.keys()} if load_tensors else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a safetensors file ({error})") from None
    return metadata, tensors


def _parse_header(metadata: Mapping[str, str], path: Path) -> CheckpointMeta:
    if META_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a PPOKL checkpoint (no '{META_KEY}' metadata)")
    try:
        raw = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the '{META_KEY}' metadata is not valid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the '{META_KEY}' metadata is nested too deeply to be a checkpoint's") from None
    return parse_meta(raw, path)


def read_meta(path: str | Path) -> CheckpointMeta:
    """The parsed metadata of a PPOKL checkpoint, without reading its tensors."""
    path = Path(path)
    return _parse_header(_open(path, load_tensors=False)[0], path)


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a PPOKL checkpoint; ``CheckpointError`` for anything else.

    Only the safetensors reader touches the file: a pickled checkpoint is never deserialised.
    """
    path = Path(path)
    metadata, tensors = _open(path, load_tensors=True)
    return _parse_header(metadata, path), tensors
