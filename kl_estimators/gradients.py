"""Gradient estimators for the sequence-level reverse KL of an autoregressive policy, on- and off-policy.

    KL(pi(.|x) || pi_ref(.|x)) = E_{y~pi}[ sum_t k1_t ] = E_{y~pi}[ sum_t KL_t(s_t) ],   s_t = (x, y_<t),

with k1_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t), KL_t = KL(pi(.|s_t) || pi_ref(.|s_t)) (exact, over
the vocabulary), score_t = grad log pi(y_t|s_t), sg = stop-gradient. Sequences may come from a
behaviour policy mu (the policy that sampled them: pi_old after the first PPO/GRPO step, or an
inference engine); ``behaviour_logprobs`` = log mu(y_t|s_t), None meaning mu = sg(pi).
rho_t = pi/mu at token t and W_t = prod_{t'<=t} rho_t' (``kl_estimators.weights``).

Every estimator is a per-token loss term [B, T]; its autograd gradient, summed over tokens, is the
named estimator, and its value is a KL estimate. ``kl_estimators.ESTIMATOR_INFO`` states for each
what the expected gradient and value equal on- and off-policy; ``tests/test_kl_expectations.py``
proves every statement by exact enumeration on tabular policies.

    estimator            per-token term (gradient in words)
    reinforce            sg(k1_t) + score_t sg(sum_t' k1_t')              REINFORCE, whole-sequence return
    reinforce-future     sg(k1_t) + score_t sg(sum_{t'>=t} k1_t')         returns-to-go (= k1 in the reward)
    reinforce-future-is  sg(W_t k1_t) + score_t sg(sum_{t'>=t} W_t' k1_t') per-decision IS: unbiased off-policy
    analytic             KL_t                                             direct part only
    analytic-is          sg(W_{t-1}) KL_t                                 direct part at pi's states
    analytic-future      KL_t + score_t sg(sum_{t'>t} KL_t')              Rao-Blackwellised, unbiased on-policy
    analytic-future-is   sg(W_{t-1}) KL_t + score_t sg(sum_{t'>t} W_{t'-1} KL_t')   unbiased off-policy
    k1-loss, k2-loss, k3-loss, abs-loss   k1_t, k2_t, k3_t, |k1_t| differentiated directly
    k1+, k3+             value k1_t / k3_t, gradient of k2_t (verl's straight-through "+")
    k3-ratio             rho_t k3_t, rho_t differentiable (DeepSeek-V3.2, TRL use_bias_correction_kl)
    k3+is                value k3_t, gradient sg(rho_t) grad k2_t (OpenRLHF's unbiased_gradient)
    k3-reward            sg(k3_t) + score_t sg(sum_{t'>=t} k3_t')         k3 in the reward

Estimators that ignore the behaviour policy accept ``importance="token"`` (each term times
sg(rho_t), as PPO's ratio does) or ``importance="sequence"`` (times sg(W_T): then the off-policy
expectation of gradient and value equals the on-policy one exactly). ``weight_clip`` truncates or
clamps every importance weight's value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kl_estimators._checks import check_mask, check_ndim, check_same_shape, upcast
from kl_estimators.fused import LinearLogits
from kl_estimators.info import ESTIMATOR_INFO
from kl_estimators.values import analytic, k1, k2, k3
from kl_estimators.weights import WeightClip, check_weight_clip, prefix_log_ratios, token_log_ratios, weight

IMPORTANCE = ("token", "sequence")


@dataclass(frozen=True)
class _Batch:
    """Validated inputs: [B, T] log-probs set to 0 where ``mask`` is False, log rho_t, options."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    mask: torch.Tensor
    log_rho: torch.Tensor
    logits: torch.Tensor | LinearLogits | None
    ref_logits: torch.Tensor | LinearLogits | None
    weight_clip: WeightClip
    chunk_size: int | None
    given_kl: torch.Tensor | None = None

    @property
    def score(self) -> torch.Tensor:
        """0 in value, score_t = grad log pi(y_t|s_t) in gradient (0 where masked)."""
        return self.logprobs - self.logprobs.detach()

    def k(self, estimate: Callable[..., torch.Tensor]) -> torch.Tensor:
        """A per-token estimate (k1, k2, k3) of the sampled tokens, 0 where masked."""
        return estimate(self.logprobs, self.ref_logprobs, self.mask)

    def kl(self) -> torch.Tensor:
        """KL_t, the exact KL at every position, 0 where masked."""
        if self.given_kl is not None:
            return torch.where(self.mask, upcast(self.given_kl), 0.0)
        return analytic(self.logits, self.ref_logits, mask=self.mask, chunk_size=self.chunk_size)

    def prefix_weight(self, inclusive: bool) -> torch.Tensor:
        """Constant W_t (``inclusive``) or W_{t-1}, clipped; 0 where masked (so that an overflowed
        weight after the end of a sequence does not turn its zero terms into NaN)."""
        return torch.where(self.mask, weight(prefix_log_ratios(self.log_rho, inclusive), self.weight_clip, differentiable=False), 0.0)

    def on_policy(self) -> _Batch:
        """The same batch with mu = sg(pi): every importance weight is 1."""
        return replace(self, log_rho=torch.zeros_like(self.log_rho), weight_clip=None)


def _suffix_sum(x: torch.Tensor, strict: bool) -> torch.Tensor:
    """sum_{t' >= t} x_t' (or t' > t when ``strict``) along the last dim."""
    if strict:
        x = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    return x.flip(-1).cumsum(-1).flip(-1)


def _straight_through(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """Equal to ``value``; its gradient is that of ``gradient_of``."""
    return value.detach() + gradient_of - gradient_of.detach()


def _reward_to_go(b: _Batch, rewards: torch.Tensor) -> torch.Tensor:
    """sg(r_t) + score_t sg(sum_{t'>=t} r_t'): the policy gradient of per-token rewards -r_t."""
    return rewards.detach() + b.score * _suffix_sum(rewards, strict=False).detach()


def _reinforce(b: _Batch) -> torch.Tensor:
    k1_t = b.k(k1)
    return k1_t.detach() + b.score * k1_t.sum(-1, keepdim=True).detach()


def _reinforce_future_is(b: _Batch) -> torch.Tensor:
    return _reward_to_go(b, b.prefix_weight(inclusive=True) * b.k(k1))


def _analytic_is(b: _Batch) -> torch.Tensor:
    return b.prefix_weight(inclusive=False) * b.kl()


def _analytic_future_is(b: _Batch) -> torch.Tensor:
    weighted_kl = _analytic_is(b)
    return weighted_kl + b.score * _suffix_sum(weighted_kl, strict=True).detach()


_TERMS: dict[str, Callable[[_Batch], torch.Tensor]] = {
    "reinforce": _reinforce,
    "reinforce-future": lambda b: _reinforce_future_is(b.on_policy()),
    "reinforce-future-is": _reinforce_future_is,
    "analytic": lambda b: b.kl(),
    "analytic-is": _analytic_is,
    "analytic-future": lambda b: _analytic_future_is(b.on_policy()),
    "analytic-future-is": _analytic_future_is,
    "k1-loss": lambda b: b.k(k1),
    "k2-loss": lambda b: b.k(k2),
    "k3-loss": lambda b: b.k(k3),
    "abs-loss": lambda b: b.k(k1).abs(),
    "k1+": lambda b: _straight_through(b.k(k1), b.k(k2)),
    "k3+": lambda b: _straight_through(b.k(k3), b.k(k2)),
    "k3-ratio": lambda b: weight(b.log_rho, b.weight_clip, differentiable=True) * b.k(k3),
    "k3+is": lambda b: _straight_through(b.k(k3), weight(b.log_rho, b.weight_clip, differentiable=False) * b.k(k2)),
    "k3-reward": lambda b: _reward_to_go(b, b.k(k3)),
}
ESTIMATORS: tuple[str, ...] = tuple(_TERMS)  # the order of ESTIMATOR_INFO (checked by the tests)
"""The names of the 16 gradient estimators, the ``estimator`` argument of ``per_token_kl_loss``."""


def _check_support(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor | None, mask: torch.Tensor) -> None:
    """ValueError where a generated token has log-prob -inf under pi or mu.

    A masked policy pi^M (logits -inf outside its mask) scored on tokens that a behaviour policy
    sampled outside that mask has pi^M(y_t) = 0: its importance weight is 0 and every log-ratio
    term is -inf or NaN. The unbiased rule would give those sequences weight 0, but it silently
    hides a rollout/update mask mismatch, so it is an error: re-apply the rollout's masks (as
    PPOKL does) so that pi^M and mu share their support, or drop those sequences.
    """
    for name, values in (("logprobs", logprobs), ("behaviour_logprobs", behaviour_logprobs)):
        if values is not None and bool(torch.isneginf(values.detach()[mask]).any()):
            count = int(torch.isneginf(values.detach()[mask]).sum())
            raise ValueError(
                f"{name} is -inf at {count} generated token(s): a sampled token has zero probability under that "
                "policy (a masked policy scored on tokens sampled outside its mask?); re-apply the rollout's "
                "action masks or drop those sequences"
            )


def _check_inputs(estimator, logprobs, ref_logprobs, mask, logits, ref_logits, behaviour_logprobs, importance, kl) -> None:
    if estimator not in _TERMS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_ndim("logprobs", logprobs, 2, "[B, T]")
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    if behaviour_logprobs is not None:
        check_same_shape("logprobs", logprobs, "behaviour_logprobs", behaviour_logprobs)
    if mask is None:
        raise ValueError("mask is required: a bool [B, T] tensor, True at generated tokens")
    check_mask(mask, logprobs.shape)
    _check_support(logprobs, behaviour_logprobs, mask)
    info = ESTIMATOR_INFO[estimator]
    if importance is not None and importance not in IMPORTANCE:
        raise ValueError(f"importance must be None or one of {IMPORTANCE}, got {importance!r}")
    if importance is not None and info.uses_behaviour:
        raise ValueError(f"importance must be None for {estimator!r}, which weights by behaviour_logprobs itself")
    if not info.needs_logits:
        return
    if kl is not None:
        if logits is not None or ref_logits is not None:
            raise ValueError("give either kl or logits and ref_logits, not both")
        check_same_shape("logprobs", logprobs, "kl", kl)
        return
    if logits is None or ref_logits is None:
        raise ValueError(f"estimator {estimator!r} needs logits and ref_logits ([B, T, V] or LinearLogits) or kl ([B, T])")
    if isinstance(logits, LinearLogits) or isinstance(ref_logits, LinearLogits):
        if not (isinstance(logits, LinearLogits) and isinstance(ref_logits, LinearLogits)):
            raise ValueError("logits and ref_logits must both be tensors or both be LinearLogits")
    else:
        check_ndim("logits", logits, 3, "[B, T, V]")
    if logits.shape[:2] != logprobs.shape:
        raise ValueError(
            f"logits must be [B, T, V] with [B, T] = logprobs.shape {tuple(logprobs.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    check_same_shape("logits", logits, "ref_logits", ref_logits)


def per_token_kl_loss(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor | LinearLogits | None = None,
    ref_logits: torch.Tensor | LinearLogits | None = None,
    *,
    behaviour_logprobs: torch.Tensor | None = None,
    importance: str | None = None,
    weight_clip: WeightClip = None,
    chunk_size: int | None = None,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T] per-token KL loss terms (0 where ``mask`` is False) whose gradient is ``estimator``.

    The drop-in for a framework's per-token KL term: logprobs, ref_logprobs and
    behaviour_logprobs are log pi, log pi_ref and log mu (the "old"/rollout policy) of the sampled
    tokens, [B, T]; ref and behaviour inputs are constants. logits, ref_logits: [B, T, V], or
    ``LinearLogits`` (hidden states and output layers: the KL is then computed by
    ``kl_estimators.fused_kl`` without [B, T, V] logits), for the analytic estimators only;
    ``kl``: KL_t [B, T] already computed with its gradient (e.g. ``fused_kl(...).kl`` from the pass
    that gave ``logprobs``), in their place. The guarantees of ``ESTIMATOR_INFO`` hold for the sum over tokens
    divided by a constant (a batch token-sum or token-mean), not for per-sequence length
    normalisation. ``importance``: "token" or "sequence" importance weighting of an estimator that
    ignores mu; ``weight_clip``: c (min(w, c)) or (lo, hi) on every importance weight;
    ``chunk_size``: rows per chunk of ``analytic`` or ``fused_kl``. A term that would be NaN (a +inf
    KL met by a straight-through or a zero weight, an overflowed log-ratio) is a ``ValueError``.

    Args:
        estimator: one of ``ESTIMATORS`` (see ``ESTIMATOR_INFO`` for what its expected gradient equals).
        logprobs: log pi(y_t | s_t) of the sampled tokens, [B, T], differentiable.
        ref_logprobs: log pi_ref(y_t | s_t), [B, T]; treated as a constant.
        mask: bool [B, T], True at the tokens that count (generated, not padding).
        logits: the policy's logits [B, T, V] or ``LinearLogits``; for the analytic estimators only.
        ref_logits: the reference's logits [B, T, V] or ``LinearLogits``; constant; analytic estimators only.
        behaviour_logprobs: log mu(y_t | s_t) of the policy that sampled the batch (pi_old, an
            inference engine), [B, T], constant; None means on-policy (mu = pi).
        importance: "token" or "sequence" importance weighting of an estimator that ignores mu, or None.
        weight_clip: c (each weight becomes min(w, c)) or (lo, hi) (clamped), or None.
        chunk_size: positions per chunk of ``analytic`` / ``fused_kl``; None for all at once.
        kl: KL_t [B, T] already computed with its gradient (e.g. ``fused_kl(...).kl``), in place of
            ``logits`` and ``ref_logits``.

    Returns:
        The per-token terms [B, T], 0 where ``mask`` is False; sum them over tokens (divided by a
        constant) and add beta times that to the loss.

    Raises:
        ValueError: an unknown estimator or importance, mismatched shapes, missing or superfluous
            logits, a sampled token with zero probability under mu, or a term that would be NaN.
    """
    _check_inputs(estimator, logprobs, ref_logprobs, mask, logits, ref_logits, behaviour_logprobs, importance, kl)
    check_weight_clip(weight_clip)
    batch = _Batch(
        logprobs=torch.where(mask, upcast(logprobs), 0.0),
        ref_logprobs=torch.where(mask, upcast(ref_logprobs).detach(), 0.0),
        mask=mask,
        log_rho=token_log_ratios(logprobs, behaviour_logprobs, mask),
        logits=logits,
        ref_logits=ref_logits.detach() if isinstance(ref_logits, torch.Tensor) else ref_logits,
        weight_clip=weight_clip,
        chunk_size=chunk_size,
        given_kl=kl,
    )
    terms = _TERMS[estimator](batch)
    if importance == "token":
        terms = terms * weight(batch.log_rho, weight_clip, differentiable=False)
    elif importance == "sequence":
        terms = terms * weight(batch.log_rho.sum(-1, keepdim=True), weight_clip, differentiable=False)
    nan = torch.isnan(terms.detach())
    if bool(nan.any()):  # inf - inf or 0 * inf inside an estimator: refused, never returned
        raise ValueError(
            f"{estimator}: the loss is NaN at {int(nan.sum())} token(s): a KL term there is +inf (pi puts mass "
            "outside pi_ref's support) or a log-ratio overflowed; mask those positions or pass weight_clip"
        )
    return terms


def sequence_kl_loss(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor | LinearLogits | None = None,
    ref_logits: torch.Tensor | LinearLogits | None = None,
    *,
    behaviour_logprobs: torch.Tensor | None = None,
    importance: str | None = None,
    weight_clip: WeightClip = None,
    chunk_size: int | None = None,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch mean over B of the per-sequence sums of ``per_token_kl_loss`` (same arguments); 0 for
    an empty batch (B = 0).

    Its gradient's expectation over y ~ mu (mu = pi when ``behaviour_logprobs`` is None) is what
    ``ESTIMATOR_INFO[estimator]`` states; its value is the batch mean of a KL estimate.

    Args:
        estimator: one of ``ESTIMATORS`` (see ``ESTIMATOR_INFO`` for what its expected gradient equals).
        logprobs: log pi(y_t | s_t) of the sampled tokens, [B, T], differentiable.
        ref_logprobs: log pi_ref(y_t | s_t), [B, T]; treated as a constant.
        mask: bool [B, T], True at the tokens that count (generated, not padding).
        logits: the policy's logits [B, T, V] or ``LinearLogits``; for the analytic estimators only.
        ref_logits: the reference's logits [B, T, V] or ``LinearLogits``; constant; analytic estimators only.
        behaviour_logprobs: log mu(y_t | s_t) of the policy that sampled the batch (pi_old, an
            inference engine), [B, T], constant; None means on-policy (mu = pi).
        importance: "token" or "sequence" importance weighting of an estimator that ignores mu, or None.
        weight_clip: c (each weight becomes min(w, c)) or (lo, hi) (clamped), or None.
        chunk_size: positions per chunk of ``analytic`` / ``fused_kl``; None for all at once.
        kl: KL_t [B, T] already computed with its gradient (e.g. ``fused_kl(...).kl``), in place of
            ``logits`` and ``ref_logits``.

    Returns:
        A scalar: the mean over the batch of each sequence's summed terms.

    Raises:
        ValueError: an unknown estimator or importance, mismatched shapes, missing or superfluous
            logits, or a sampled token with zero probability under mu.
    """
    per_sequence = per_token_kl_loss(
        estimator,
        logprobs,
        ref_logprobs,
        mask,
        logits,
        ref_logits,
        behaviour_logprobs=behaviour_logprobs,
        importance=importance,
        weight_clip=weight_clip,
        chunk_size=chunk_size,
        kl=kl,
    ).sum(-1)
    return per_sequence.mean() if per_sequence.numel() else per_sequence.sum()
