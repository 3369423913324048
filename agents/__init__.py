"""PPO with exact KL handling for lmgym text environments (SB3-compatible).

The public names load on first use (PEP 562), so ``import agents.cli.config`` stays light."""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"PPOKL": "agents.algorithm", "CausalLMPolicy": "agents.policy", "LMGymVecEnv": "agents.vec_env"}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
