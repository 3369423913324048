"""One draw per row from a categorical over the vocabulary, by inverse CDF with one uniform per row.

For logits ``z`` [N, V], row ``n`` draws token ``i`` with probability ``w_i / W``, where
``w_i = exp(z_i - max_j z_j)`` and ``W = sum_i w_i``: one uniform ``u ~ U[0, 1)`` per row picks the
token whose interval ``[C_{i-1}, C_i)`` of the cumulative sums ``C_i = w_1 + ... + w_i`` holds
``u W``. The search runs in two levels so that it stays exact without a float64 pass over the
whole vocabulary: the float64 cumulative sum of the masses of blocks of ``BLOCK`` tokens picks a
block, then the float64 cumulative sum of that block's ``BLOCK`` weights picks the token. Every
token's probability is then ``w_i / W`` up to the float32 rounding of ``w_i`` itself (a relative
error of about 1e-7, which ``softmax`` has too) and the float64 rounding of the sums, and a token
with ``w_i = 0`` (logit ``-inf``) is never drawn.

Why not ``torch.multinomial`` (what ``torch.distributions.Categorical`` and HF ``generate`` call):
it draws one exponential variate per vocabulary entry, ``N x V`` of them per step. On SmolLM2's
49,152-token vocabulary at 24 rows and one CPU thread that draw took 23 ms, and its exponentials
were 8.5 % of the sampling loop's time; this one takes 2.4 ms (docs/benchmarks.md, "The sampler
against ``generate``"). The price is the random stream: the same seed no longer gives ``generate``'s tokens, only
tokens from the same distribution (tests/test_sampler.py proves the distribution, and the
decoder's logits against ``generate``'s, separately). ``sample_multinomial`` keeps the old draw
(PPOKL's ``sampler="multinomial"``): ``generate``'s tokens for the same seed, and those of runs
made before the inverse CDF.
"""
from __future__ import annotations

import torch

BLOCK = 256  # tokens per block of the two-level search


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``a ~ softmax(logits)`` per row and return ``(a, log softmax(logits)[a])``.

    Args:
        logits: ``[N, V]`` unnormalised log-probabilities (float), with a finite entry in every row.
        generator: random generator for the uniforms (None: the global one of ``logits``' device).

    Returns:
        actions ``[N]`` (long) and their log-probabilities ``[N]`` (logits' dtype):
        ``z_a - max z - log W``.
    """
    n, vocab = logits.shape
    shift = logits.amax(dim=-1, keepdim=True)
    weights = torch.sub(logits, shift).exp_()  # in place: out of place took 5x longer at [24, 49152] on one thread
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * BLOCK - vocab))
    weights = weights.view(n, blocks, BLOCK)
    block_cdf = weights.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [N, blocks]
    total = block_cdf[:, -1:]
    u = torch.rand(n, 1, dtype=torch.float64, device=logits.device, generator=generator) * total
    block = first_above(block_cdf, u)  # [N, 1]: block_cdf[block - 1] <= u < block_cdf[block]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    rows = torch.arange(n, device=logits.device)
    within_cdf = weights[rows, block.squeeze(-1)].double().cumsum(dim=-1)  # [N, BLOCK]
    offset = first_above(within_cdf, u - before)
    actions = block * BLOCK + offset
    logprobs = logits.gather(-1, actions) - shift - total.log().to(logits.dtype)
    return actions.squeeze(-1), logprobs.squeeze(-1)


def first_above(cdf: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row, the first index ``i`` with ``cdf[i] > value`` (``[N, K]`` non-decreasing ``cdf``,
    ``[N, 1]`` ``value``), so that entry ``i`` has positive mass; a ``value`` at or above the row's
    last entry (float rounding of ``u * total``) gives the last index with positive mass."""
    index = torch.searchsorted(cdf, value, right=True)
    last_positive = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)  # first index reaching the total
    return torch.minimum(index, last_positive)


def sample_multinomial(logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_categorical``'s contract with ``torch.distributions.Categorical``'s draw, bit for bit
    and from the same random stream: normalised logits ``z - logsumexp(z)``, their ``softmax`` and
    ``torch.multinomial(probs, 1, replacement=True)`` (so, for the same seed, the tokens of HF
    ``generate`` with ``do_sample=True``, ``top_k=0``, ``top_p=1``, ``temperature=1``), without the
    distribution object's argument validation and broadcasting.

    Args:
        logits: ``[N, V]`` unnormalised log-probabilities (float).
        generator: random generator for ``torch.multinomial`` (None: the global one).

    Returns:
        actions ``[N]`` (long) and their log-probabilities ``[N]`` (logits' dtype).
    """
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = normalized.softmax(dim=-1)
    actions = torch.multinomial(probs, 1, True, generator=generator)
    return actions.squeeze(-1), normalized.gather(-1, actions).squeeze(-1)
