"""KL values: per-token Monte-Carlo estimates (k1, k2, k3) and the exact per-position KL.

All functions are elementwise over leading (batch) dimensions. float16/bfloat16 inputs are
computed in float32 and the result is float32; other dtypes are kept.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kl_estimators._checks import (
    check_mask,
    check_positive_int,
    check_same_shape,
    compute_dtype,
    upcast,
)
from kl_estimators._support import row_chunks, support_log_ratio
from kl_estimators.fused import LinearLogits, fused_analytic


def _masked_pair(
    logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, upcast, and zero both log-probs where ``mask`` is False (so every k is 0 there)."""
    check_same_shape("logp", logp, "logq", logq)
    check_mask(mask, logp.shape)
    logp, logq = upcast(logp), upcast(logq)
    if mask is not None:
        logp, logq = torch.where(mask, logp, 0.0), torch.where(mask, logq, 0.0)
    return logp, logq


def k1(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k1 = log p(y) - log q(y), for y ~ p. Unbiased for KL(p||q); can be negative.

    Args:
        logp: log p(y) of the sampled tokens y ~ p, any shape.
        logq: log q(y) of the same tokens, the shape of ``logp``.
        mask: optional bool tensor of that shape; the estimate is 0 where it is False.

    Returns:
        The per-token estimate, the shape of ``logp``.

    Raises:
        ValueError: the shapes differ.
    """
    logp, logq = _masked_pair(logp, logq, mask)
    return logp - logq


def k2(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k2 = (log p(y) - log q(y))^2 / 2, for y ~ p. Non-negative, biased for KL(p||q).

    Args:
        logp: log p(y) of the sampled tokens y ~ p, any shape.
        logq: log q(y) of the same tokens, the shape of ``logp``.
        mask: optional bool tensor of that shape; the estimate is 0 where it is False.

    Returns:
        The per-token estimate, the shape of ``logp``.

    Raises:
        ValueError: the shapes differ.
    """
    logp, logq = _masked_pair(logp, logq, mask)
    return 0.5 * (logp - logq) ** 2


def k3(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k3 = r - 1 - log r with r = q(y)/p(y), for y ~ p. Non-negative, unbiased for KL(p||q).

    Args:
        logp: log p(y) of the sampled tokens y ~ p, any shape.
        logq: log q(y) of the same tokens, the shape of ``logp``.
        mask: optional bool tensor of that shape; the estimate is 0 where it is False.

    Returns:
        The per-token estimate, the shape of ``logp``.

    Raises:
        ValueError: the shapes differ.
    """
    logp, logq = _masked_pair(logp, logq, mask)
    log_ratio = logq - logp
    return torch.expm1(log_ratio) - log_ratio


def _row_log_probs(
    logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of [N, V] rows; rows where ``mask`` is False become uniform vs uniform (KL 0).
    A row of ``logits_q`` that is -inf everywhere (no support) has log q = -inf everywhere (so the
    KL is +inf there), not the NaN of its log-softmax; ``logits_p`` has no such row (``analytic``)."""
    logits_p, logits_q = upcast(logits_p), upcast(logits_q)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        logits_p, logits_q = torch.where(keep, logits_p, 0.0), torch.where(keep, logits_q, 0.0)
    empty_q = torch.isneginf(logits_q).all(-1, keepdim=True)
    logq = torch.where(empty_q, 0.0, logits_q).log_softmax(-1)
    return logits_p.log_softmax(-1), torch.where(empty_q, -torch.inf, logq)


def _kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p||q) per row of [N, V] log-probs, with 0 log 0 = 0 and +inf where p > 0 = q.

    Only entries in both supports enter the differentiated sum, so no -inf/NaN reaches backward;
    rows with p > 0 = q are set to +inf through ``torch.where`` and receive a zero gradient.
    """
    log_ratio, infinite = support_log_ratio(logp, logq)
    return torch.where(infinite, torch.inf, (logp.exp() * log_ratio).sum(-1))


class _ChunkedKL(torch.autograd.Function):
    """Row-chunked exact KL over [N, V] logits; saves only the inputs and recomputes in backward.

    Backward per row: d KL / d logits_p = p * (log p - log q - KL), d KL / d logits_q = q - p.
    Rows with KL = +inf or ``mask`` False get a zero gradient, as in the unchunked path.
    """

    @staticmethod
    def forward(ctx, logits_p, logits_q, mask, chunk_size):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(logits_p, logits_q, mask)
        ctx.chunk_size = chunk_size
        out = logits_p.new_empty(logits_p.shape[0], dtype=compute_dtype(logits_p, logits_q))
        for rows in row_chunks(logits_p.shape[0], chunk_size):
            logp, logq = _row_log_probs(logits_p[rows], logits_q[rows], _rows_of(mask, rows))
            out[rows] = _kl_from_log_probs(logp, logq)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):  # noqa: D102 (autograd protocol)
        logits_p, logits_q, mask = ctx.saved_tensors
        want_p, want_q = ctx.needs_input_grad[:2]
        grad_p = torch.empty_like(logits_p) if want_p else None
        grad_q = torch.empty_like(logits_q) if want_q else None
        for rows in row_chunks(logits_p.shape[0], ctx.chunk_size):
            row_mask = _rows_of(mask, rows)
            logp, logq = _row_log_probs(logits_p[rows], logits_q[rows], row_mask)
            kl = _kl_from_log_probs(logp, logq)
            finite = torch.isfinite(kl) if row_mask is None else torch.isfinite(kl) & row_mask
            g = torch.where(finite, grad_kl[rows], 0.0).unsqueeze(-1)
            p = logp.exp()
            if want_p:
                both = ~torch.isneginf(logp) & ~torch.isneginf(logq)
                centred = torch.where(both, logp - logq - torch.where(finite, kl, 0.0).unsqueeze(-1), 0.0)
                grad_p[rows] = p * centred * g
            if want_q:
                grad_q[rows] = (logq.exp() - p) * g
        return grad_p, grad_q, None, None


def _rows_of(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


def analytic(
    logits_p: torch.Tensor | LinearLogits,
    logits_q: torch.Tensor | LinearLogits,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact KL(softmax(logits_p) || softmax(logits_q)) = sum_v p_v (log p_v - log q_v), reducing ``dim``.

    -inf logits (masked vocabulary) are allowed: entries with p = 0 contribute 0, and the KL is
    +inf where p > 0 = q (so +inf where every logit of q is -inf); a position where every logit
    of p is -inf (p has no support) is a ``ValueError``, unless ``mask`` is False there. Gradients are finite wherever the KL is finite:
    d KL / d logits_p = p * (log p - log q - KL), d KL / d logits_q = q - p.
    ``mask`` has the shape of the result; where it is False the KL is 0 with zero gradient.
    ``chunk_size=N`` processes N positions (rows of the flattened leading dims) at a time in
    forward and backward, so the extra memory does not grow with the number of positions.
    ``LinearLogits`` (hidden states and output layers, [B, T, d] -> [B, T, V] along the last dim)
    in place of both logits: computed by ``kl_estimators.fused_kl`` without the [B, T, V] logits.

    Args:
        logits_p: the logits of p (the policy), any shape with the vocabulary on ``dim``, or ``LinearLogits``.
        logits_q: the logits of q (the reference), the shape of ``logits_p``, or ``LinearLogits``.
        dim: the vocabulary dimension, reduced.
        mask: optional bool tensor of the result's shape; the KL is 0 (zero gradient) where it is False.
        chunk_size: positions per chunk (memory-bounded mode); None computes all positions at once.

    Returns:
        The exact KL per position: ``logits_p``'s shape without ``dim``, float32 or wider.

    Raises:
        ValueError: the shapes differ, ``dim`` is out of range, ``chunk_size`` is not a positive
            integer, or ``LinearLogits`` come with a ``dim`` other than the last.
    """
    if isinstance(logits_p, LinearLogits) or isinstance(logits_q, LinearLogits):
        if dim not in (-1, 2):
            raise ValueError(f"LinearLogits have the vocabulary on the last dim, got dim={dim}")
        return fused_analytic(logits_p, logits_q, mask=mask, chunk_size=chunk_size)
    check_same_shape("logits_p", logits_p, "logits_q", logits_q)
    if logits_p.dim() == 0:
        raise ValueError("logits_p must have at least one dimension (the vocabulary)")
    if not -logits_p.dim() <= dim < logits_p.dim():
        raise ValueError(f"dim must be in [-{logits_p.dim()}, {logits_p.dim()}), got {dim}")
    lead_shape = logits_p.movedim(dim, -1).shape[:-1]
    check_mask(mask, lead_shape)
    vocab = logits_p.shape[dim]
    rows_p = logits_p.movedim(dim, -1).reshape(-1, vocab)
    rows_q = logits_q.movedim(dim, -1).reshape(-1, vocab)
    row_mask = None if mask is None else mask.reshape(-1)
    empty_p = torch.isneginf(rows_p).all(-1) if vocab else torch.ones(rows_p.shape[0], dtype=torch.bool, device=rows_p.device)
    if row_mask is not None:
        empty_p &= row_mask
    if bool(empty_p.any()):
        raise ValueError(
            f"logits_p is -inf at every token in {int(empty_p.sum())} position(s) (no support: not a distribution); "
            "mask those positions out"
        )
    if chunk_size is None:
        kl = _kl_from_log_probs(*_row_log_probs(rows_p, rows_q, row_mask))
    else:
        check_positive_int("chunk_size", chunk_size)
        kl = _ChunkedKL.apply(rows_p, rows_q, row_mask, chunk_size)
    return kl.reshape(lead_shape)
