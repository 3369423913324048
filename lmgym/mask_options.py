"""The one check of the action-mask options top-k and top-p, without torch (``lmgym.masks`` and
``agents.options`` both use it)."""
from __future__ import annotations


def mask_option_errors(top_k: object, top_p: object, k_name: str = "mask top_k", p_name: str = "mask top_p") -> list[str]:
    """Why ``top_k`` (an integer >= 1 or None) and ``top_p`` (a number in (0, 1] or None) are
    invalid, one line each naming ``k_name`` / ``p_name``; empty if both are valid."""
    errors = []
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        errors.append(f"{k_name} must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        errors.append(f"{p_name} must be in (0, 1] or None, got {top_p!r}")
    return errors


def check_mask_options(top_k: int | None, top_p: float | None) -> None:
    """ValueError for an out-of-range top-k (>= 1) or top-p (in (0, 1])."""
    errors = mask_option_errors(top_k, top_p)
    if errors:
        raise ValueError("; ".join(errors))
