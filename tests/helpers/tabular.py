"""Tiny tabular autoregressive policies with exact enumeration of all V^T sequences (float64).

A policy's next-token logits are a table with one row per prefix y_<t (all prefixes of length
0..T-1), so every expectation over sequences is a finite, exact sum. Three tables: the policy pi
(a leaf that requires grad), the reference pi_ref and the behaviour policy mu (constants); mu is
a random table, or pi's own values (mu = pi passed explicitly), or absent (mu = pi on-policy).

Exact quantities are computed here from softmaxes directly, independently of ``kl_estimators``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st


def prefix_rows(seqs: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, T] row of a prefix table (rows ordered by length, then lexicographically) holding the
    next-token logits at each position of ``seqs`` [N, T]."""
    index = torch.zeros_like(seqs)
    offset, code = 0, torch.zeros(len(seqs), dtype=torch.long)
    for t in range(seqs.shape[1]):
        index[:, t] = offset + code
        offset += vocab**t
        code = code * vocab + seqs[:, t]
    return index


@dataclass
class Tabular:
    """Policy, reference and behaviour tables, [n_prefixes, V] each."""

    table: torch.Tensor
    ref_table: torch.Tensor
    vocab: int
    length: int
    behaviour_table: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        """All V^T sequences, [N, T]."""
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))

    @property
    def mask(self) -> torch.Tensor:
        """All positions are generated tokens, [N, T]."""
        return torch.ones(len(self.sequences), self.length, dtype=torch.bool)

    def prefix_index(self) -> torch.Tensor:
        """[N, T] row of the table holding the next-token logits at each position."""
        return prefix_rows(self.sequences, self.vocab)

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference logits for every sequence and position, [N, T, V]."""
        index = self.prefix_index()
        return self.table[index], self.ref_table[index]

    def _token_logprobs(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.prefix_index()].log_softmax(-1).gather(-1, self.sequences.unsqueeze(-1)).squeeze(-1)

    def logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of each sequence's own tokens under policy and reference, [N, T]."""
        return self._token_logprobs(self.table), self._token_logprobs(self.ref_table)

    def behaviour_logprobs(self) -> torch.Tensor:
        """log mu of each sequence's own tokens, [N, T], constant (pi's values when mu is absent)."""
        table = self.table if self.behaviour_table is None else self.behaviour_table
        return self._token_logprobs(table.detach())

    def probs(self, sampler: str) -> torch.Tensor:
        """P(y) under ``sampler`` ("pi" or "mu"), [N], constant."""
        logp = self.logprobs()[0].detach() if sampler == "pi" else self.behaviour_logprobs()
        return logp.sum(-1).exp()

    def expect(self, per_sequence: torch.Tensor, sampler: str) -> torch.Tensor:
        """sum_y P_sampler(y) per_sequence(y), the probabilities held constant."""
        return (self.probs(sampler) * per_sequence).sum()

    def reverse_kl(self) -> torch.Tensor:
        """Exact KL(pi || pi_ref) over sequences, differentiable through P(y) too."""
        logp, ref_logp = self.logprobs()
        return (logp.sum(-1).exp() * (logp - ref_logp).sum(-1)).sum()

    def forward_kl(self) -> torch.Tensor:
        """Exact KL(pi_ref || pi) over sequences."""
        logp, ref_logp = self.logprobs()
        ref_seq, seq = ref_logp.sum(-1), logp.sum(-1)
        return (ref_seq.exp() * (ref_seq - seq)).sum()

    def position_divergences(self) -> dict[str, torch.Tensor]:
        """Per position [N, T], differentiable in pi: KL(pi||pi_ref), KL(pi_ref||pi), sum_v |pi - pi_ref|."""
        logits, ref_logits = self.logits()
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        p, ref_p = logp.exp(), ref_logp.exp()
        return {
            "reverse": (p * (logp - ref_logp)).sum(-1),
            "forward": (ref_p * (ref_logp - logp)).sum(-1),
            "l1": (p - ref_p).abs().sum(-1),
        }

    def grad(self, value: torch.Tensor) -> torch.Tensor:
        """d value / d table."""
        return torch.autograd.grad(value, self.table)[0]

    def gradient_quantity(self, key: str, sampler: str) -> torch.Tensor:
        """The exact gradient named ``key`` in ``kl_estimators.GRADIENT_QUANTITIES``, states from ``sampler``."""
        positions = self.position_divergences()
        logp, ref_logp = self.logprobs()
        if key == "grad_kl":
            return self.grad(self.reverse_kl())
        if key == "direct":
            return self.grad(self.expect(positions["reverse"].sum(-1), sampler))
        if key == "direct_pi":
            return self.grad(self.expect(positions["reverse"].sum(-1), "pi"))
        if key == "zero":
            return torch.zeros_like(self.table)
        if key == "neg_grad_kl_mu_pi":  # -grad KL(mu || pi) = grad E_mu[log pi(y)]
            return self.grad(self.expect(logp.sum(-1), "mu"))
        if key == "forward_direct":
            return self.grad(self.expect(positions["forward"].sum(-1), sampler))
        if key == "abs_direct":
            return self.grad(self.expect(positions["l1"].sum(-1), sampler))
        if key == "k2_mu":
            return self.grad(self.expect((0.5 * (logp - ref_logp) ** 2).sum(-1), "mu"))
        if key == "grad_kl_minus_forward_direct":
            return self.gradient_quantity("grad_kl", sampler) - self.gradient_quantity("forward_direct", sampler)
        raise KeyError(key)


def make_tabular(vocab: int, length: int, seed: int, scale: float = 2.0, behaviour: str = "none") -> Tabular:
    """Random N(0, scale^2) tables; ``behaviour``: "none" (mu absent), "random", or "policy" (mu = pi)."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(vocab**t for t in range(length))
    table = (scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    ref_table = scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    behaviour_table = {
        "none": None,
        "random": scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64),
        "policy": table.detach().clone(),
    }[behaviour]
    return Tabular(table, ref_table, vocab, length, behaviour_table)


@st.composite
def tabulars(draw, max_length: int = 4, behaviour: bool = False) -> Tabular:
    """Hypothesis strategy: V in 2..5, T in 1..max_length, seeded random tables; with ``behaviour``,
    mu is a random table (4 draws in 5) or pi itself."""
    return make_tabular(
        vocab=draw(st.integers(2, 5)),
        length=draw(st.integers(1, max_length)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.floats(0.1, 3.0)),
        behaviour=draw(st.sampled_from(["random"] * 4 + ["policy"])) if behaviour else "none",
    )
