"""Tiny tabular autoregressive policies with exact enumeration of all V^T sequences (float64).

A policy's next-token logits are a table with one row per prefix y_<t (all prefixes of length
0..T-1), so every expectation over sequences is a finite, exact sum.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass
class Tabular:
    """A policy table (leaf, requires grad) and a constant reference table, both [n_prefixes, V]."""

    table: torch.Tensor
    ref_table: torch.Tensor
    vocab: int
    length: int

    @property
    def sequences(self) -> torch.Tensor:
        """All V^T sequences, [N, T]."""
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))

    def prefix_index(self) -> torch.Tensor:
        """[N, T] row of the table holding the next-token logits at each position."""
        seqs = self.sequences
        index = torch.zeros_like(seqs)
        offset, code = 0, torch.zeros(len(seqs), dtype=torch.long)
        for t in range(self.length):
            index[:, t] = offset + code
            offset += self.vocab**t
            code = code * self.vocab + seqs[:, t]
        return index

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference logits for every sequence and position, [N, T, V]."""
        index = self.prefix_index()
        return self.table[index], self.ref_table[index]

    def logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of each sequence's own tokens under policy and reference, [N, T]."""
        tokens = self.sequences.unsqueeze(-1)
        logits, ref_logits = self.logits()
        logp = logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
        ref_logp = ref_logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
        return logp, ref_logp

    def sequence_probs(self) -> torch.Tensor:
        """P(y) under the policy, [N], differentiable."""
        return self.logprobs()[0].sum(-1).exp()

    def reverse_kl(self) -> torch.Tensor:
        """Exact KL(pi || pi_ref) over sequences, differentiable through P(y) too."""
        logp, ref_logp = self.logprobs()
        return (self.sequence_probs() * (logp - ref_logp).sum(-1)).sum()

    def forward_kl(self) -> torch.Tensor:
        """Exact KL(pi_ref || pi) over sequences."""
        logp, ref_logp = self.logprobs()
        ref_seq, seq = ref_logp.sum(-1), logp.sum(-1)
        return (ref_seq.exp() * (ref_seq - seq)).sum()

    def grad(self, value: torch.Tensor) -> torch.Tensor:
        """d value / d table."""
        return torch.autograd.grad(value, self.table)[0]


def make_tabular(vocab: int, length: int, seed: int, scale: float = 2.0) -> Tabular:
    """Random policy and reference tables with N(0, scale^2) logits."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(vocab**t for t in range(length))
    table = (scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    ref_table = scale * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    return Tabular(table, ref_table, vocab, length)


@st.composite
def tabulars(draw, max_length: int = 4) -> Tabular:
    """Hypothesis strategy: V in 2..5, T in 1..max_length, seeded random tables."""
    return make_tabular(
        vocab=draw(st.integers(2, 5)),
        length=draw(st.integers(1, max_length)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.floats(0.1, 3.0)),
    )
