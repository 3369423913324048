"""How the CLI's outputs show numbers: rounded, and an exact KL never below 0 by round-off.

The exact KL, KL(pi(.|s) || pi_ref(.|s)) = sum_v p_v (log p_v - log q_v), is >= 0; summed in
floating point it can come out as -1e-9 when pi = pi_ref, which a fixed-point format prints as
"-0.000". Sampled estimates (k1, the KL in the reward) can be negative for real and are shown as
they are.
"""

from __future__ import annotations

from agents import metrics

# metrics.csv columns that hold an exact KL (the analytic KL per sequence of the rollout)
EXACT_KL = frozenset({metrics.KL_ANALYTIC})


def shown(key: str, value: float) -> float:
    """``value`` as it should be shown: an exact KL (``key`` in ``EXACT_KL``) clamped at 0.

    Args:
        key: the metric's name (a metrics.csv column).
        value: its value.

    Returns:
        ``max(value, 0.0)`` for an exact KL, else ``value``.
    """
    return max(value, 0.0) if key in EXACT_KL else value


def fmt(key: str, value: object, spec: str) -> str:
    """A metric formatted with ``spec`` (e.g. ``".3f"``), "-" when missing, without "-0.000".

    Args:
        key: the metric's name.
        value: its value (a number, a numeric string, None or "").
        spec: a format specification.

    Returns:
        The formatted text.
    """
    if value in (None, ""):
        return "-"
    text = format(shown(key, float(value)), spec)
    negative_zero = text.startswith("-") and float(text) == 0.0
    return text.replace("-", "+" if "+" in spec else "", 1) if negative_zero else text


def rounded(key: str, value: object, digits: int = 4) -> str:
    """A metric with ``digits`` significant digits, for tables (the model card): "0.1235", "1.2e-05".

    Args:
        key: the metric's name.
        value: its value (a number or a numeric string); other values are returned as text.
        digits: significant digits.

    Returns:
        The rounded text.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return fmt(key, number, f".{digits}g")
