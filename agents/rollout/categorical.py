"""One draw per row from a categorical over the vocabulary, without ``torch.distributions``.

``sample_categorical(logits)`` returns exactly what ``Categorical(logits=logits)`` followed by
``.sample()`` and ``.log_prob(action)`` returns, bit for bit and from the same random stream:
the same normalised logits ``z - logsumexp(z)``, the same ``softmax`` of them, the same
``torch.multinomial(probs, 1, replacement=True)`` call (and so the same tokens as HF ``generate``
with ``do_sample=True``, ``top_k=0``, ``top_p=1``, ``temperature=1``, which draws with
``torch.multinomial(softmax(z), 1)``; tests/test_sampler.py checks both). What it leaves out is
the distribution object's per-step overhead: argument validation over the ``[N, V]`` logits (an
``isfinite``-style reduction and ``all``), broadcasting in ``log_prob``, and the lazy-property
machinery, about 16 small ops per step on the sampler's profile.
"""
from __future__ import annotations

import torch


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``a ~ softmax(logits)`` per row and return ``(a, log softmax(logits)[a])``.

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
