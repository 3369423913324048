"""Input validation and dtype helpers shared by the KL modules.

Every check raises ``ValueError`` naming the offending argument; nothing is broadcast silently.
"""

from __future__ import annotations

import math

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in float32 if it is float16/bfloat16, otherwise unchanged."""
    return x.float() if x.dtype in _HALF_DTYPES else x


def compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The promoted dtype of ``a`` and ``b``, raised to float32 if it is float16/bfloat16."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Require ``a`` and ``b`` to have exactly the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: "
            f"got {name_b}.shape={tuple(b.shape)}, {name_a}.shape={tuple(a.shape)}"
        )


def check_ndim(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    """Require ``x`` to have ``ndim`` dimensions (``layout`` describes them, e.g. "[B, T]")."""
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def check_mask(mask: torch.Tensor | None, shape: torch.Size, name: str = "mask") -> None:
    """Require an optional mask to be a bool tensor of exactly ``shape``."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def check_positive_int(name: str, value: int) -> None:
    """Require ``value`` to be an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
    """``value`` as a float once it is a real number (not bool), finite, and in the range
    [low, high] (``open_low``: (low, high]); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (number <= low if open_low else number < low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and number > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return number
