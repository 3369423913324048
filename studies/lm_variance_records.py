"""The LM variance study's raw files: one safetensors file of per-sequence tensors per (policy,
regime), with the run's metadata as JSON. Written by ``studies.lm_variance``, read by it (to resume)
and by ``studies.lm_variance_report``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agents.cli.run_dir import atomic_write


def raw_path(raw: Path, policy: str, regime: str) -> Path:
    """The raw file of policy ``policy`` sampled in ``regime`` (on / off)."""
    return raw / f"{policy}-{regime}.safetensors"


def save_raw(path: Path, data: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one raw file (per-sequence tensors + JSON metadata) atomically."""
    tensors = {k: v.contiguous() for k, v in data.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)}))


def load_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The per-sequence tensors of one raw file and its metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta
