"""Importance weights for KL-gradient estimators on sequences sampled from a behaviour policy mu.

    rho_t = pi(y_t|s_t) / mu(y_t|s_t)            token ratio
    W_t   = prod_{t' <= t} rho_t'                 prefix ratio (W_0 = 1), W_T the sequence ratio

For any f that depends on y only through y_<=t, E_{y~mu}[W_t f(y)] = E_{y~pi}[f(y)]: the prefix
ratio up to the last token a term depends on is what makes an off-policy term unbiased (Precup et
al. 2000, per-decision importance sampling). Without behaviour log-probs, mu = sg(pi): every weight
is 1 in value while a differentiable weight still carries the score, grad W_t = W_t sum_{t'<=t} score_t'.

Clipping (``weight_clip``) applies to the weight's value: a float c gives min(w, c) (truncated IS,
as in TIS); a pair (lo, hi) gives clamp(w, lo, hi). A differentiable weight keeps the gradient
clip(w) * grad log w (the truncated-IS convention, not PPO's zero gradient outside the range).

Clipping is applied before exponentiating (exp(min(log w, log c + 1)), then min(., c): the same
value, with no overflow), so clipped weights are finite for any log-ratio. An unclipped weight
overflows float32 once log w > 88.7 (float64: 709.8); it is then inf and a ``RuntimeWarning``
says so: pass ``weight_clip``.
"""

from __future__ import annotations

import math
import warnings

import torch

from kl_estimators._checks import upcast

WeightClip = float | tuple[float, float] | None


# The largest clip: weights are computed in float32 at least, whose largest finite value this is.
MAX_WEIGHT_CLIP = float(torch.finfo(torch.float32).max)


def check_weight_clip(weight_clip: WeightClip) -> None:
    """ValueError unless ``weight_clip`` is None, a finite float 0 < c <= ``MAX_WEIGHT_CLIP``, or a
    pair 0 <= lo <= hi <= ``MAX_WEIGHT_CLIP`` (hi > 0)."""
    if weight_clip is None:
        return

    def fits(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= MAX_WEIGHT_CLIP

    if isinstance(weight_clip, tuple) and len(weight_clip) == 2:
        lo, hi = weight_clip
        if fits(lo) and fits(hi) and lo <= hi and hi > 0:
            return
    elif fits(weight_clip) and weight_clip > 0:
        return
    raise ValueError(f"weight_clip must be None, a float c > 0 or a pair (lo, hi) with 0 <= lo <= hi, (finite, at most {MAX_WEIGHT_CLIP:.4g}), got {weight_clip!r}")


def token_log_ratios(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """log rho_t = log pi(y_t|s_t) - log mu(y_t|s_t), [B, T], 0 where ``mask`` is False.

    Differentiable through ``logprobs`` only; mu = sg(pi) when ``behaviour_logprobs`` is None.
    """
    logprobs = torch.where(mask, upcast(logprobs), 0.0)
    if behaviour_logprobs is None:
        return logprobs - logprobs.detach()
    return logprobs - torch.where(mask, upcast(behaviour_logprobs).detach(), 0.0)


def prefix_log_ratios(log_rho: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """log W_t = sum_{t' <= t} log rho_t' (``inclusive``) or sum_{t' < t} (log W_{t-1})."""
    cumulative = log_rho.cumsum(-1)
    return cumulative if inclusive else cumulative - log_rho


def weight(log_w: torch.Tensor, weight_clip: WeightClip, differentiable: bool) -> torch.Tensor:
    """exp(log_w) clipped; if ``differentiable``, with gradient clip(w) * grad log_w, else constant."""
    log_w_value = log_w.detach()
    if weight_clip is None:
        value = log_w_value.exp()
        if bool(torch.isinf(value).any()) and bool(torch.isfinite(log_w_value).all()):
            warnings.warn(
                f"unclipped importance weights overflow {value.dtype} (a log-ratio reaches "
                f"{float(log_w_value.max()):.4g}): they are inf; pass weight_clip to truncate them",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        low, high = weight_clip if isinstance(weight_clip, tuple) else (0.0, weight_clip)
        value = log_w_value.clamp(max=math.log(high) + 1).exp().clamp(low, high)
    return value * torch.exp(log_w - log_w.detach()) if differentiable else value
