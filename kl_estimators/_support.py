"""The support-aware pieces shared by the exact KL of ``values`` and of ``fused``.

KL(p || q) = sum_v p_v (log p_v - log q_v) with 0 log 0 = 0 (tokens outside p's support add
nothing) and KL = +inf where some token has p > 0 = q. Only entries in both supports enter the
differentiated sum, so no -inf or NaN reaches backward.
"""
from __future__ import annotations

import torch


def support_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p - log q`` [..., V] where both p > 0 and q > 0 (0 elsewhere), and [...] bool: the rows
    with a token where p > 0 = q (their KL is +inf)."""
    in_p = ~torch.isneginf(logp)
    outside_q = in_p & torch.isneginf(logq)
    return torch.where(in_p & ~outside_q, logp - logq, 0.0), outside_q.any(-1)


def row_chunks(n: int, size: int) -> list[slice]:
    """Slices of ``size`` rows (the last may be shorter) covering ``range(n)``."""
    return [slice(start, start + size) for start in range(0, n, size)]
