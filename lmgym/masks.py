"""Action masks by sb3-contrib's convention: ``env.action_masks()`` is a bool array, True = allowed.

A mask keeps the top-k and/or top-p (nucleus) tokens of a *masking distribution* at the current
state. For logits z with softmax probabilities p sorted in decreasing order p_(1) >= p_(2) >= ...:

- top-k keeps the k most probable tokens;
- top-p keeps the smallest prefix {(1), ..., (m)} with p_(1) + ... + p_(m) >= p (so the most
  probable token is always kept, and m = V at p = 1);
- both together keep the intersection (top-p computed on the full distribution), never empty.

Ties at the boundary are broken by ``torch.sort`` (stable, lower token id first). The masses are
summed in float64, p = 1 keeps every token and the most probable token is kept for any p > 0. The masking
distribution is the reference model's by default (``ActionMasker(top_k, top_p)``), or a
caller-supplied ``model`` (a causal LM run on the observation) or ``logits_fn``
(``(input_ids, attention_mask) -> [N, V]`` logits at the last position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lmgym.decoding import forward_last
from lmgym.mask_options import check_mask_options

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, V]``: ``model``'s next-token logits after each row of a left-padded batch."""
    out = forward_last(model, input_ids.to(model.device), attention_mask.to(model.device), 1)
    return out.logits[:, -1].float()


def top_k_top_p_mask(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """bool ``[..., V]``: the tokens kept by top-k and top-p of ``softmax(logits)`` (see the module
    docstring); all True when both are None.

    Args:
        logits: next-token logits, [..., V].
        top_k: keep the k most probable tokens, or None.
        top_p: keep the smallest set of most probable tokens whose probability reaches p, or None.

    Returns:
        bool [..., V], True at the kept tokens.

    Raises:
        ValueError: ``top_k`` < 1 or ``top_p`` outside (0, 1].
    """
    check_mask_options(top_k, top_p)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k is None and top_p is None:
        return keep
    order = torch.sort(logits.double(), dim=-1, descending=True, stable=True)
    rank_keep = torch.ones_like(keep)
    if top_k is not None:
        rank_keep &= torch.arange(logits.shape[-1], device=logits.device) < top_k
    if top_p is not None and top_p < 1:  # p = 1 keeps every token, however the mass rounds
        probs = order.values.softmax(-1)  # float64: the sums below do not lose the tail's mass
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
        rank_keep &= mass_before < torch.tensor(top_p, dtype=torch.float64, device=logits.device)
    if logits.shape[-1]:
        rank_keep[..., 0] = True  # the most probable token, whatever p (a p below float resolution too)
    return torch.zeros_like(keep).scatter(-1, order.indices, rank_keep)


@dataclass
class ActionMasker:
    """Computes masks from the reference logits (default), a masking ``model`` or a ``logits_fn``.

    Disabled (every action allowed) when ``top_k`` and ``top_p`` are both None.
    """

    top_k: int | None = None
    top_p: float | None = None
    model: PreTrainedModel | None = None
    logits_fn: LogitsFn | None = None

    def __post_init__(self) -> None:
        check_mask_options(self.top_k, self.top_p)
        if self.model is not None and self.logits_fn is not None:
            raise ValueError("give a masking model or a logits_fn, not both")

    @property
    def enabled(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    @property
    def uses_reference(self) -> bool:
        return self.model is None and self.logits_fn is None

    @torch.no_grad()
    def masking_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, V]`` next-token logits of the caller's masking distribution at the last
        position of a left-padded batch (not used for the reference, whose logits the env has)."""
        if self.logits_fn is not None:
            return torch.as_tensor(self.logits_fn(input_ids, attention_mask)).float()
        return next_token_logits(self.model, input_ids, attention_mask)

    def masks(self, logits: torch.Tensor) -> torch.Tensor:
        """bool ``[N, V]`` from masking logits ``[N, V]``."""
        return top_k_top_p_mask(logits, self.top_k, self.top_p)
