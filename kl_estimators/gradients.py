"""Gradient estimators for the sequence-level reverse KL of an autoregressive policy.

    KL(pi(.|x) || pi_ref(.|x)) = E_{y~pi}[ sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t) ]
                               = E_{y~pi}[ sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) ],   s_t = (x, y_<t).

Each estimator is a per-sequence surrogate whose autograd gradient, for one sampled y ~ pi, is
the named estimator; its docstring states what that gradient equals in expectation. Notation:
score_t = grad log pi(y_t|s_t), k1_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t),
KL_t = KL(pi(.|s_t) || pi_ref(.|s_t)). ``sg`` is stop-gradient.

    estimator          surrogate                                  E[gradient]
    reinforce          sum_t score_t * sg(sum_t' k1_t')           grad KL
    reinforce-future   sum_t score_t * sg(sum_{t'>=t} k1_t')      grad KL (lower variance)
    analytic           sum_t KL_t                                 grad KL at T = 1; biased for T > 1
    analytic-future    sum_t KL_t + score_t * sg(sum_{t'>t} KL_t') grad KL
    k1-loss            sum_t k1_t                                 0
    k2-loss            sum_t k2_t                                 grad KL at T = 1; partial for T > 1
    k3-loss            sum_t k3_t                                 grad KL(pi_ref || pi) at T = 1
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kl_estimators._checks import check_mask, check_ndim, check_same_shape, upcast
from kl_estimators.values import analytic, k1, k2, k3


def _score(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y_t|s_t) with masked positions set to 0 (and no gradient)."""
    return torch.where(mask, upcast(logprobs), 0.0)


def _suffix_sum(x: torch.Tensor, strict: bool) -> torch.Tensor:
    """sum_{t' >= t} x_t' (or t' > t when ``strict``) along the last dim."""
    if strict:
        x = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    return x.flip(-1).cumsum(-1).flip(-1)


def _reinforce(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t score_t * sg(sum_t' k1_t').  Unbiased: E = grad KL.

    The pathwise term sum_t score_t of grad E_pi[f_theta] is left out (its expectation is 0).
    """
    returns = k1(logprobs, ref_logprobs, mask).sum(-1).detach()
    return _score(logprobs, mask).sum(-1) * returns


def _reinforce_future(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t score_t * sg(sum_{t' >= t} k1_t').  Unbiased: E = grad KL.

    Earlier k1_t' (t' < t) depend only on s_t, and E[score_t | s_t] = 0, so dropping them keeps
    the expectation and lowers the variance.
    """
    returns_to_go = _suffix_sum(k1(logprobs, ref_logprobs, mask), strict=False).detach()
    return (_score(logprobs, mask) * returns_to_go).sum(-1)


def _analytic_only(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t KL_t(s_t), differentiated directly: E = E_pi[sum_t grad KL_t(s_t)].

    Biased for T > 1: it holds the state distribution fixed, missing how y_t changes later KLs.
    Exact (zero variance) for T = 1.
    """
    return analytic(logits, ref_logits, mask=mask, chunk_size=chunk_size).sum(-1)


def _analytic_future(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t KL_t(s_t) + score_t * sg(sum_{t' > t} KL_t'(s_t')).  Unbiased: E = grad KL.

    It is the exact gradient of KL = E[sum_t KL_t(s_t)]: the direct term plus the score-function
    term for the later positions' states.
    """
    kl = analytic(logits, ref_logits, mask=mask, chunk_size=chunk_size)
    future = _suffix_sum(kl, strict=True).detach()
    return (kl + _score(logprobs, mask) * future).sum(-1)


def _k1_loss(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t k1_t differentiated directly: grad = sum_t score_t, E = 0 (zero mean, no signal)."""
    return k1(logprobs, ref_logprobs, mask).sum(-1)


def _k2_loss(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t k2_t differentiated directly: grad = sum_t score_t * k1_t.

    T = 1: E = grad KL. T > 1: biased ("partial"), it misses each token's effect on later k1.
    """
    return k2(logprobs, ref_logprobs, mask).sum(-1)


def _k3_loss(logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size):
    """sum_t k3_t differentiated directly (GRPO's KL loss): grad = sum_t score_t * (1 - pi_ref/pi).

    T = 1: E = -E_pi[(pi_ref/pi) score] = grad KL(pi_ref || pi), the FORWARD KL's gradient,
    not the reverse one (Tang & Munos 2025, arXiv 2506.09477).
    """
    return k3(logprobs, ref_logprobs, mask).sum(-1)


_SURROGATES: dict[str, Callable[..., torch.Tensor]] = {
    "reinforce": _reinforce,
    "reinforce-future": _reinforce_future,
    "analytic": _analytic_only,
    "analytic-future": _analytic_future,
    "k1-loss": _k1_loss,
    "k2-loss": _k2_loss,
    "k3-loss": _k3_loss,
}
ESTIMATORS: tuple[str, ...] = tuple(_SURROGATES)
_NEEDS_LOGITS = frozenset({"analytic", "analytic-future"})


def _check_inputs(estimator, logprobs, ref_logprobs, mask, logits, ref_logits) -> None:
    if estimator not in _SURROGATES:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_ndim("logprobs", logprobs, 2, "[B, T]")
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    if mask is None:
        raise ValueError("mask is required: a bool [B, T] tensor, True at generated tokens")
    check_mask(mask, logprobs.shape)
    if estimator not in _NEEDS_LOGITS:
        return
    if logits is None or ref_logits is None:
        raise ValueError(f"estimator {estimator!r} needs logits and ref_logits ([B, T, V])")
    check_ndim("logits", logits, 3, "[B, T, V]")
    if logits.shape[:2] != logprobs.shape:
        raise ValueError(
            f"logits must be [B, T, V] with [B, T] = logprobs.shape {tuple(logprobs.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    check_same_shape("logits", logits, "ref_logits", ref_logits)


def sequence_kl_loss(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Batch mean over B of a per-sequence surrogate whose gradient is ``estimator``.

    logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under pi and pi_ref
    (``ref_logprobs`` is treated as constant). mask: [B, T] bool, True at generated tokens;
    masked positions contribute nothing. logits, ref_logits: [B, T, V], required by
    "analytic" and "analytic-future" (``ref_logits`` constant); ``chunk_size`` is passed to
    ``analytic``. See ``ESTIMATORS`` and each surrogate's docstring for its expected gradient.
    """
    _check_inputs(estimator, logprobs, ref_logprobs, mask, logits, ref_logits)
    ref_logprobs = ref_logprobs.detach()
    ref_logits = None if ref_logits is None else ref_logits.detach()
    per_sequence = _SURROGATES[estimator](logprobs, ref_logprobs, mask, logits, ref_logits, chunk_size)
    return per_sequence.mean()
