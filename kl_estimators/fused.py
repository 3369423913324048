"""The exact per-position KL and the sampled tokens' log-probs from hidden states and output layers,
without ever holding the [B, T, V] logits.

A model's logits are z = (h W^T + b) / tau, with h its final hidden state [B, T, d], W its output
layer's weight [V, d] (tied to the input embedding or not), b an optional bias [V] (-inf entries
mask tokens out) and tau the sampling temperature. The product h W^T runs in float32 (float64 for
float64 inputs), or in ``product_dtype`` when one is given (bfloat16: the logits an output layer
gives under bfloat16 autocast); the log-softmax, KL, entropy and gradient terms are float32 either
way. ``LinearLogits`` names such logits without computing them; ``fused_kl`` walks the positions in chunks of ``chunk_size`` rows, computes each
chunk's logits of both models, and keeps only per-position results:

    KL_t     = sum_v p_v (log p_v - log q_v)        p = softmax(z_pi), q = softmax(z_ref)
    logp_t   = log p_{y_t},  ref_logp_t = log q_{y_t},  H_t = -sum_v p_v log p_v

Backward recomputes each chunk's logits (nothing [chunk, V] is saved), so the extra memory is
O(chunk_size x V) whatever B x T is. With g the incoming gradients of a row, the gradient with
respect to the policy's logits is

    dz = g_KL p (log p - log q - KL) + g_logp (onehot(y) - p) - g_H p (log p + H),

and dh = dz W / tau, dW = dz^T h / tau, db = sum_rows dz / tau (both products in the policy's
``product_dtype``, dW summed over chunks in float32). The reference gets no gradient.
Conventions match ``kl_estimators.analytic`` on the materialised logits: 0 log 0 = 0, KL = +inf
where p > 0 = q (with a zero gradient), and masked positions give 0 with a zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kl_estimators._checks import check_mask, check_ndim, check_number, check_positive_int, upcast
from kl_estimators._support import row_chunks, support_log_ratio

# Elements of one [chunk, V] block when ``chunk_size`` is None: 2^24 float32 = 64 MiB per block; the
# peak holds about four such blocks (bench/bench_fused.py).
AUTO_CHUNK_ELEMENTS = 2**24

PRODUCT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LinearLogits:
    """Logits (hidden @ weight^T + bias) / temperature, given by their factors and never materialised.

    ``hidden`` [B, T, d], ``weight`` [V, d] (an output layer's, tied to the embedding or not),
    ``bias`` [V] or None (not -inf everywhere: no support), ``temperature`` > 0 and finite. Pass one per model where the KL functions take
    [B, T, V] logits (``fused_kl``, ``per_token_kl_loss``, ``sequence_kl_loss``).

    Args:
        hidden: final hidden states h, [B, T, d].
        weight: the output layer's weight W, [V, d].
        bias: the output layer's bias b, [V], or None; -inf entries exclude tokens.
        temperature: tau > 0; the logits are (h W^T + b) / tau.
        product_dtype: the dtype h W^T (and, for the policy, its backward products) runs in, or None
            for float32 (float64 when h or W is float64). ``torch.bfloat16`` reproduces an output
            layer under bfloat16 autocast: the product is rounded to bfloat16, then upcast.

    Raises:
        ValueError: the shapes do not fit together, ``temperature`` is not a number > 0 or
            ``product_dtype`` is not a floating-point dtype.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    temperature: float = 1.0
    product_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        check_ndim("hidden", self.hidden, 3, "[B, T, d]")
        check_ndim("weight", self.weight, 2, "[V, d]")
        if self.weight.shape[1] != self.hidden.shape[2]:
            raise ValueError(
                f"weight must be [V, d] with d = hidden.shape[-1] = {self.hidden.shape[2]}, got {tuple(self.weight.shape)}"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{self.weight.shape[0]}], got {tuple(self.bias.shape)}")
        check_number("temperature", self.temperature, low=0.0, open_low=True)
        if self.product_dtype is not None and self.product_dtype not in PRODUCT_DTYPES:
            raise ValueError(f"product_dtype must be None or one of {PRODUCT_DTYPES}, got {self.product_dtype!r}")
        if self.bias is not None and bool(torch.isneginf(self.bias).all()):
            raise ValueError("bias is -inf for every token: the logits have no support (no distribution to take a KL of)")

    @property
    def shape(self) -> torch.Size:
        """[B, T, V], the shape of the logits these factors stand for."""
        return torch.Size((*self.hidden.shape[:2], self.weight.shape[0]))

    def materialise(self) -> torch.Tensor:
        """The [B, T, V] logits themselves (for tests and small V; the point of the class is not to)."""
        return _logits(self.hidden, self.weight, self.bias, self.temperature, self.product_dtype)


class FusedKL(NamedTuple):
    """Per-position results of ``fused_kl``, each [B, T], 0 where the mask is False.

    Attributes:
        kl: KL(pi(.|s_t) || pi_ref(.|s_t)), differentiable; 0 when no reference is given.
        logprobs: log pi(y_t|s_t), differentiable; 0 when no tokens are given.
        ref_logprobs: log pi_ref(y_t|s_t), constant; 0 when no reference is given.
        entropy: H(pi(.|s_t)), differentiable.
    """

    kl: torch.Tensor  # KL(pi(.|s_t) || pi_ref(.|s_t)); 0 when no reference is given
    logprobs: torch.Tensor  # log pi(y_t|s_t)
    ref_logprobs: torch.Tensor  # log pi_ref(y_t|s_t), constant; 0 when no reference is given
    entropy: torch.Tensor  # H(pi(.|s_t))


def _product(a: torch.Tensor, b: torch.Tensor, product_dtype: torch.dtype | None, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with both factors in ``product_dtype`` (None: ``dtype``), returned in ``dtype``."""
    product_dtype = product_dtype or dtype
    return (a.to(product_dtype) @ b.to(product_dtype)).to(dtype)


def _add_product(
    total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, product_dtype: torch.dtype | None
) -> torch.Tensor:
    """total + a @ b in a's dtype (total None: a @ b), the product in ``product_dtype``; without a
    separate product dtype no [rows(a), cols(b)] temporary is made."""
    if product_dtype in (None, a.dtype):
        return a @ b if total is None else total.addmm_(a, b)
    product = _product(a, b, product_dtype, a.dtype)
    return product if total is None else total.add_(product)


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float, product_dtype: torch.dtype | None = None
) -> torch.Tensor:
    dtype = torch.promote_types(upcast(hidden).dtype, upcast(weight).dtype)
    z = _product(hidden, weight.T, product_dtype, dtype)
    if bias is not None:
        z += bias.to(dtype)
    return z.div_(temperature) if temperature != 1 else z


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise sum_v a_v b_v of [n, V] tensors, without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


class _Layer(NamedTuple):
    """An output layer as the chunks use it: ``weight`` already in ``product_dtype``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float
    product_dtype: torch.dtype

    @classmethod
    def cast(cls, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float, product_dtype: torch.dtype | None,
             hidden: torch.Tensor) -> _Layer:
        """The layer with its weight cast once (not once per chunk) to the products' dtype: ``product_dtype``,
        or None for ``hidden``'s and ``weight``'s promoted dtype, at least float32."""
        product_dtype = product_dtype or torch.promote_types(upcast(hidden).dtype, upcast(weight).dtype)
        return cls(weight.to(product_dtype), bias, temperature, product_dtype)

    def log_probs(self, hidden: torch.Tensor, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log-softmax [n, V] of the rows' logits and their log-normaliser [n] (given: not recomputed)."""
        z = _logits(hidden, self.weight, self.bias, self.temperature, self.product_dtype)
        if lse is None:
            lse = torch.logsumexp(z, -1)
        return z.sub_(lse.unsqueeze(-1)), lse


def _forward_terms(logp: torch.Tensor, logq: torch.Tensor | None, finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KL [n] (0 without ``logq``; +inf where p > 0 = q) and entropy [n]; overwrites ``logq``.

    ``finite``: every logit is finite, so no 0 log 0 or p > 0 = q case needs masking."""
    p = logp.exp()
    if finite:
        entropy = -_dot(p, logp)
        kl = torch.zeros_like(entropy) if logq is None else _dot(p, logq.neg_().add_(logp))
        return kl, entropy
    in_p = ~torch.isneginf(logp)
    entropy = -_dot(p, torch.where(in_p, logp, 0.0))
    if logq is None:
        return torch.zeros_like(entropy), entropy
    log_ratio, infinite = support_log_ratio(logp, logq)
    return torch.where(infinite, torch.inf, _dot(p, log_ratio)), entropy


def _logit_gradient(
    logp: torch.Tensor,
    logq: torch.Tensor | None,
    tokens: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    finite: bool,
) -> torch.Tensor:
    """dz [n, V] = g_KL p (log p - log q - KL) + g_logp (onehot(y) - p) - g_H p (log p + H);
    rows with KL = +inf get no KL gradient. Overwrites ``logp``."""
    g_kl, g_logp, g_entropy = (None if g is None else g.unsqueeze(-1) for g in grads)
    zero = torch.zeros_like(kl).unsqueeze(-1)
    if logq is None or g_kl is None:
        g_kl = zero
    kl_ok = torch.isfinite(kl).unsqueeze(-1)
    g_kl = torch.where(kl_ok, g_kl, 0.0)
    g_logp = zero if g_logp is None else g_logp
    g_entropy = zero if g_entropy is None else g_entropy
    # p (a log p - g_KL log q - c) with a = g_KL - g_H, c = g_KL KL + g_logp + g_H H
    c = g_kl * torch.where(kl_ok, kl.unsqueeze(-1), 0.0) + g_logp + g_entropy * entropy.unsqueeze(-1)
    p = logp.exp()
    if finite:
        dz = logp.mul_(g_kl - g_entropy)
        if logq is not None:
            dz.addcmul_(logq, g_kl, value=-1)
        dz.sub_(c).mul_(p)
    else:
        in_p = ~torch.isneginf(logp)
        safe_logq = 0.0 if logq is None else torch.where(in_p & ~torch.isneginf(logq), logq, 0.0)
        dz = torch.where(in_p, p * ((g_kl - g_entropy) * logp - g_kl * safe_logq - c), 0.0)
    return dz.scatter_add_(-1, tokens.unsqueeze(-1), g_logp.expand(-1, 1).contiguous())


def _is_finite(*biases: torch.Tensor | None) -> bool:
    return all(b is None or bool(torch.isfinite(b).all()) for b in biases)


class _FusedKLRows(torch.autograd.Function):
    """Chunked (KL, logp, ref_logp, entropy) over n rows of hidden states; recomputes in backward.

    Forward saves the inputs and four numbers per row (both log-normalisers, KL, entropy); backward
    recomputes each chunk's logits and forms dz with them (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_p, w_p, b_p, h_q, w_q, b_q, tokens, tau_p, tau_q, products, chunk):  # noqa: D102 (autograd protocol)
        ctx.set_materialize_grads(False)
        policy = _Layer.cast(w_p, b_p, tau_p, products[0], h_p)
        reference = None if h_q is None else _Layer.cast(w_q, b_q, tau_q, products[1], h_q)
        finite = _is_finite(b_p, b_q)
        n = h_p.shape[0]
        dtype = torch.promote_types(upcast(h_p).dtype, upcast(w_p).dtype)
        kl, logp_y, logq_y, entropy, lse_p, lse_q = (h_p.new_zeros(n, dtype=dtype) for _ in range(6))
        for rows in row_chunks(n, chunk):
            y = tokens[rows].unsqueeze(-1)
            logp, lse_p[rows] = policy.log_probs(h_p[rows])
            logp_y[rows] = logp.gather(-1, y).squeeze(-1)
            logq = None
            if reference is not None:
                logq, lse_q[rows] = reference.log_probs(h_q[rows])
                logq_y[rows] = logq.gather(-1, y).squeeze(-1).to(dtype)
            kl[rows], entropy[rows] = _forward_terms(logp, logq, finite)
        ctx.save_for_backward(h_p, w_p, b_p, h_q, w_q, b_q, tokens, lse_p, lse_q, kl, entropy)
        ctx.tau_p, ctx.tau_q, ctx.products, ctx.chunk, ctx.finite = tau_p, tau_q, products, chunk, finite
        ctx.mark_non_differentiable(logq_y)
        return kl, logp_y, logq_y, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl, g_logp, _g_logq, g_entropy):  # noqa: D102 (autograd protocol)
        h_p, w_p, b_p, h_q, w_q, b_q, tokens, lse_p, lse_q, kl, entropy = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if g_kl is None and g_logp is None and g_entropy is None:
            return (None,) * 11
        policy = _Layer.cast(w_p, b_p, ctx.tau_p, ctx.products[0], h_p)
        reference = None if h_q is None or g_kl is None else _Layer.cast(w_q, b_q, ctx.tau_q, ctx.products[1], h_q)
        dtype = kl.dtype
        grad_h = torch.zeros_like(h_p) if want_h else None
        grad_w = grad_b = None
        for rows in row_chunks(h_p.shape[0], ctx.chunk):
            logp, _ = policy.log_probs(h_p[rows], lse_p[rows])
            logq = None if reference is None else reference.log_probs(h_q[rows], lse_q[rows])[0]
            grads = tuple(None if g is None else g[rows] for g in (g_kl, g_logp, g_entropy))
            dz = _logit_gradient(logp, logq, tokens[rows], kl[rows], entropy[rows], grads, ctx.finite)
            if ctx.tau_p != 1:
                dz.div_(ctx.tau_p)
            if want_h:
                grad_h[rows] = _product(dz, policy.weight, policy.product_dtype, dtype).to(h_p.dtype)
            if want_w:  # the first chunk's product initialises the sum (no [V, d] zero fill)
                grad_w = _add_product(grad_w, dz.T, h_p[rows].to(dtype), policy.product_dtype)
            if want_b:
                grad_b = dz.sum(0) if grad_b is None else grad_b.add_(dz.sum(0))
        if want_w and grad_w is None:  # no rows: every position was masked
            grad_w = torch.zeros_like(w_p)
        if want_b and grad_b is None:
            grad_b = torch.zeros_like(b_p)
        grad_w = None if grad_w is None else grad_w.to(w_p.dtype)
        grad_b = None if grad_b is None else grad_b.to(b_p.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk when ``chunk_size`` is None: ``AUTO_CHUNK_ELEMENTS // vocab`` (at least 1)."""
    return max(1, AUTO_CHUNK_ELEMENTS // vocab)


def fused_kl(
    policy: LinearLogits,
    reference: LinearLogits | None,
    tokens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> FusedKL:
    """KL_t, log pi(y_t|s_t), log pi_ref(y_t|s_t) and H(pi(.|s_t)) at every position, [B, T] each.

    Equal (up to rounding) to ``analytic(z_pi, z_ref, mask=mask)``, the log-softmax of z_pi and
    z_ref gathered at ``tokens``, and pi's entropy, on the materialised logits z; but only
    ``chunk_size`` rows of [V] logits per model exist at a time (None: ``auto_chunk_size(V)``).
    Only positions where ``mask`` is True are computed; the others are 0 with a zero gradient.
    Gradients reach ``policy``'s hidden states, weight and bias; ``reference`` is a constant
    (None: KL and ref_logprobs are 0). ``tokens`` [B, T] long (None: log-probs are 0).

    Args:
        policy: the policy's logits as ``LinearLogits`` (differentiable).
        reference: the reference's logits as ``LinearLogits`` of the same shape (constant), or None.
        tokens: the sampled tokens y_t, long [B, T], or None.
        mask: bool [B, T], True at the positions to compute, or None for all.
        chunk_size: rows of [V] logits per chunk; None picks ``auto_chunk_size(V)`` (a 64 MiB float32 block).

    Returns:
        A ``FusedKL`` of four [B, T] tensors.

    Raises:
        ValueError: the inputs are not ``LinearLogits``, their shapes differ, or ``tokens`` / ``mask``
            have the wrong shape, dtype or range.
    """
    if not isinstance(policy, LinearLogits) or not (reference is None or isinstance(reference, LinearLogits)):
        raise ValueError("policy and reference must be LinearLogits (reference may be None)")
    batch_shape = policy.hidden.shape[:2]
    if reference is not None and reference.shape != policy.shape:
        raise ValueError(f"reference logits must have the policy's shape {tuple(policy.shape)}, got {tuple(reference.shape)}")
    if tokens is not None:
        if tokens.shape != batch_shape or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor of shape {tuple(batch_shape)}, got {tokens.dtype} {tuple(tokens.shape)}")
        if bool(((tokens < 0) | (tokens >= policy.shape[2])).any()):
            raise ValueError(f"tokens must be in [0, {policy.shape[2]})")
    check_mask(mask, batch_shape)
    if chunk_size is None:
        chunk_size = auto_chunk_size(policy.shape[2])
    check_positive_int("chunk_size", chunk_size)
    d = policy.hidden.shape[2]
    rows = torch.arange(batch_shape.numel(), device=policy.hidden.device)
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    h_p = policy.hidden.reshape(-1, d)[rows]
    selected_tokens = (torch.zeros_like(rows) if tokens is None else tokens.reshape(-1)[rows])
    ref_args: tuple = (None, None, None, 1.0, None)
    if reference is not None:
        ref_weight = reference.weight.detach()
        ref_bias = None if reference.bias is None else reference.bias.detach()
        ref_hidden = reference.hidden.detach().reshape(-1, reference.hidden.shape[2])[rows]
        ref_args = (ref_hidden, ref_weight, ref_bias, reference.temperature, reference.product_dtype)
    h_q, w_q, b_q, tau_q, product_q = ref_args
    outputs = _FusedKLRows.apply(
        h_p, policy.weight, policy.bias, h_q, w_q, b_q, selected_tokens, float(policy.temperature), float(tau_q),
        (policy.product_dtype, product_q), chunk_size,
    )
    kl, logprobs, ref_logprobs, entropy = (_scatter_rows(x, rows, batch_shape) for x in outputs)
    if tokens is None:
        logprobs, ref_logprobs = torch.zeros_like(logprobs), torch.zeros_like(ref_logprobs)
    return FusedKL(kl=kl, logprobs=logprobs, ref_logprobs=ref_logprobs.detach(), entropy=entropy)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[n] values at flat ``rows`` of a zero [B, T] tensor (differentiable in ``values``)."""
    return values.new_zeros(shape.numel()).index_put((rows,), values).reshape(shape)


def fused_analytic(
    logits_p: LinearLogits, logits_q: LinearLogits, mask: torch.Tensor | None = None, chunk_size: int | None = None
) -> torch.Tensor:
    """``analytic`` for ``LinearLogits``: KL(softmax(z_p) || softmax(z_q)) [B, T] (see ``fused_kl``)."""
    if not (isinstance(logits_p, LinearLogits) and isinstance(logits_q, LinearLogits)):
        raise ValueError("logits_p and logits_q must both be tensors or both be LinearLogits")
    return fused_kl(logits_p, logits_q, mask=mask, chunk_size=chunk_size).kl
