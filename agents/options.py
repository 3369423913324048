"""PPOKL's choice lists and the one check of each of its options, without torch.

``PPOKL.__init__`` and the command line (``agents.cli.config``) both validate through
``option_errors``; the CLI names each option by its flag (``--kl-coef``), PPOKL by its argument
(``kl_coef``). Importing this module loads nothing but ``lmgym.mask_options``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from lmgym.mask_options import mask_option_errors

KL_REWARDS = ("k1", "k2", "k3", "analytic", "none")
"""The per-token KL in the reward: sampled estimates k1/k2/k3, the exact KL_t, or none."""
KL_LOSSES = ("k1-loss", "k2-loss", "k3-loss")
"""GRPO-style autodiff KL losses (for study; their biases are in ``kl_estimators.gradients``)."""
REF_LOGITS_MODES = ("store", "recompute", "hidden")
"""How the update gets pi_ref's logits (``agents.rollout.reference`` gives the memory of each)."""
SAMPLERS = ("inverse-cdf", "multinomial")
"""How the rollout draws a token (``agents.rollout.categorical``): one uniform per row, or
``torch.multinomial`` (HF ``generate``'s draw: its tokens for the same seed)."""
DTYPE_NAMES = ("float32", "bfloat16")
"""Compute dtypes of the policy (``agents.device.DTYPES`` maps them to torch dtypes)."""
VALIDATED = (
    "kl_reward", "kl_loss", "analytic_grad", "ref_logits", "sampler", "dtype", "kl_coef", "kl_target", "kl_horizon",
    "mask_top_k", "mask_top_p", "mask_sync_every",
)
"""The arguments ``option_errors`` checks (no other check of them is needed)."""
ADDED_SETTINGS = {"sampler": "multinomial"}
"""Settings added after runs had been saved without them, each with the value those runs used: a
checkpoint or args.json that lacks one resumes with it (the same draws as before)."""
UNSTORED_ARGUMENTS = ("self", "env", "device", "_init_setup_model", "__class__")
"""``PPOKL.__init__``'s arguments that are not settings: a checkpoint stores every other one."""


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_at_least_zero(name: str, value: Any) -> str | None:
    if not (_number(value) and math.isfinite(value) and value >= 0):
        return f"{name} must be a finite number >= 0, got {value!r}"
    return None


def _finite_positive(name: str, value: Any) -> str | None:
    if not (_number(value) and math.isfinite(value) and value > 0):
        return f"{name} must be a finite number > 0, got {value!r}"
    return None


def _choice(name: str, value: Any, choices: tuple[str, ...], optional: bool = False) -> str | None:
    if (value is None and optional) or value in choices:
        return None
    return f"{name} must be one of {choices}{' or None' if optional else ''}, got {value!r}"


def _integer_at_least_one(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{name} must be an integer >= 1, got {value!r}"
    return None


def option_errors(values: Mapping[str, Any], name: Callable[[str], str] = str) -> list[str]:
    """One line per invalid option among those in ``values`` (PPOKL's argument names), each naming
    the option as ``name(argument)``; empty if all are valid.

    - ``kl_reward`` in ``KL_REWARDS``; ``kl_loss`` in ``KL_LOSSES`` or None, and not together with
      ``analytic_grad`` (both add a KL gradient term); ``ref_logits`` in ``REF_LOGITS_MODES``;
      ``sampler`` in ``SAMPLERS``; ``dtype`` in ``DTYPE_NAMES``;
    - ``kl_coef`` (beta) finite and >= 0; ``kl_target`` None or finite and > 0; ``kl_horizon``
      finite and > 0 (so the adaptive controller's factor ``1 + e n / horizon`` is defined);
    - ``mask_top_k`` an integer >= 1 or None, ``mask_top_p`` in (0, 1] or None
      (``lmgym.mask_options``), ``mask_sync_every`` an integer >= 1.
    """
    errors: list[str | None] = []
    if "kl_reward" in values:
        errors.append(_choice(name("kl_reward"), values["kl_reward"], KL_REWARDS))
    if "kl_loss" in values:
        errors.append(_choice(name("kl_loss"), values["kl_loss"], KL_LOSSES, optional=True))
        if values.get("analytic_grad") and values["kl_loss"] is not None:
            errors.append(f"{name('analytic_grad')} and {name('kl_loss')} both add a KL gradient term: choose one")
    if "ref_logits" in values:
        errors.append(_choice(name("ref_logits"), values["ref_logits"], REF_LOGITS_MODES))
    if "sampler" in values:
        errors.append(_choice(name("sampler"), values["sampler"], SAMPLERS))
    if "dtype" in values:
        errors.append(_choice(name("dtype"), values["dtype"], DTYPE_NAMES))
    if "kl_coef" in values:
        errors.append(_finite_at_least_zero(name("kl_coef"), values["kl_coef"]))
    if values.get("kl_target") is not None:
        errors.append(_finite_positive(name("kl_target"), values["kl_target"]))
    if "kl_horizon" in values:
        errors.append(_finite_positive(name("kl_horizon"), values["kl_horizon"]))
    if "mask_top_k" in values or "mask_top_p" in values:
        top_k, top_p = values.get("mask_top_k"), values.get("mask_top_p")
        errors.extend(mask_option_errors(top_k, top_p, name("mask_top_k"), name("mask_top_p")))
    if "mask_sync_every" in values:
        errors.append(_integer_at_least_one(name("mask_sync_every"), values["mask_sync_every"]))
    return [error for error in errors if error is not None]


def check_options(**values: Any) -> None:
    """ValueError listing every invalid option of ``option_errors`` (named by argument)."""
    errors = option_errors(values)
    if errors:
        raise ValueError("; ".join(errors))
