"""Masked tabular policies for the masked-KL proofs (tests/test_masked_kl.py and the TRL
truncation proof): pi^M enumerated over the mask's support, the masks (fixed or a stale top-p), and
the framework-style estimate (sampling with the mask, scoring the unmasked pi)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kl_estimators import per_token_kl_loss
from lmgym.masks import top_k_top_p_mask
from tests.helpers.tabular import Tabular, prefix_rows


@dataclass
class SupportTabular(Tabular):
    """A tabular model enumerating only the sequences inside the mask ``allowed`` [rows, V]
    (the support of the masked sampler); the tables themselves are as given."""

    allowed: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        every = torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))
        index = prefix_rows(every, self.vocab)
        inside = self.allowed[index, every].all(-1)
        return every[inside]

    def prefix_index(self) -> torch.Tensor:
        return prefix_rows(self.sequences_cache, self.vocab)

    @property
    def sequences_cache(self) -> torch.Tensor:
        if not hasattr(self, "_sequences"):
            self._sequences = self.sequences
        return self._sequences

    @property
    def mask(self) -> torch.Tensor:
        return torch.ones(len(self.sequences_cache), self.length, dtype=torch.bool)

    def _token_logprobs(self, table: torch.Tensor) -> torch.Tensor:
        index = self.prefix_index()
        return table[index].log_softmax(-1).gather(-1, self.sequences_cache.unsqueeze(-1)).squeeze(-1)

    def position_divergences(self) -> dict[str, torch.Tensor]:
        """As ``Tabular``'s over the allowed tokens M(s_t) (0 log 0 = 0 outside, finite gradients):
        "forward" is sum_{v in M} pi_ref(v) log(pi_ref(v) / pi^M(v)), the forward KL without the
        reference's mass outside M (where it would be +inf); "ref_outside" is pi_ref(not M | s_t)."""
        logits, ref_logits = self.logits()
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        p, ref_p = logp.exp(), ref_logp.exp()
        inside = ~torch.isneginf(logp)
        safe_logp = torch.where(inside, logp, 0.0)
        return {
            "reverse": torch.where(inside, p * (safe_logp - ref_logp), 0.0).sum(-1),
            "forward": torch.where(inside, ref_p * (ref_logp - safe_logp), 0.0).sum(-1),
            "l1": (p - ref_p).abs().sum(-1),
            "ref_outside": torch.where(inside, 0.0, ref_p).sum(-1),
        }


def make_mask(tab: Tabular, kind: str, seed: int, top_p: float = 0.7) -> torch.Tensor:
    """bool [rows, V]: ``fixed``, random with >= 1 token per row; ``stale``, the top-p of an older
    pi (pi's table minus a random step), as NLPO's masking policy between syncs."""
    gen = torch.Generator().manual_seed(seed + 7919)
    if kind == "fixed":
        allowed = torch.rand(tab.table.shape, generator=gen, dtype=torch.float64) < 0.6
        keep = torch.randint(tab.vocab, (tab.table.shape[0], 1), generator=gen)
        return allowed.scatter(-1, keep, True)
    stale = tab.table.detach() - 0.5 * torch.randn(tab.table.shape, generator=gen, dtype=torch.float64)
    return top_k_top_p_mask(stale, None, top_p)


def masked_model(tab: Tabular, allowed: torch.Tensor) -> SupportTabular:
    """pi^M, pi_ref and (if any) mu^M: pi's and mu's tables with -inf outside ``allowed``."""
    table = tab.table.detach().masked_fill(~allowed, float("-inf")).requires_grad_()
    behaviour = None if tab.behaviour_table is None else tab.behaviour_table.masked_fill(~allowed, float("-inf"))
    return SupportTabular(table, tab.ref_table, tab.vocab, tab.length, behaviour, allowed=allowed)


def framework_model(tab: Tabular, allowed: torch.Tensor) -> Tabular:
    """Unmasked pi scored in the loss, sequences sampled by mu = sg(pi^M) (every sequence enumerated;
    those outside the mask have mu-probability 0)."""
    behaviour = tab.table.detach().masked_fill(~allowed, float("-inf"))
    return Tabular(tab.table, tab.ref_table, tab.vocab, tab.length, behaviour)


def framework_estimate(tab: Tabular, estimator: str) -> torch.Tensor:
    """E_{y ~ pi^M}[gradient of S] with S computed from the unmasked pi (mu ignored, as frameworks do)."""
    logits, ref_logits = tab.logits()
    logp, ref_logp = tab.logprobs()
    per_sequence = per_token_kl_loss(estimator, logp, ref_logp, tab.mask, logits, ref_logits).sum(-1)
    return tab.grad(tab.expect(per_sequence, "mu"))


def masked_kl_gradient(tab: Tabular, allowed: torch.Tensor) -> torch.Tensor:
    """grad KL(pi^M || pi_ref) with respect to pi's (raw) logits table."""
    raw = tab.table.detach().clone().requires_grad_()
    model = masked_model(tab, allowed)
    model.table = raw.masked_fill(~allowed, float("-inf"))
    return torch.autograd.grad(model.reverse_kl(), raw)[0]
