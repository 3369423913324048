"""Tabular autoregressive policies over all V^T sequences, and the study's problem instances.

A policy is a table of next-token logits with one row per prefix y_<t (all prefixes of length
0..T-1, ``V^0 + ... + V^(T-1)`` rows); pi(y) = prod_t softmax(table[row(y_<t)])[y_t]. Every
sequence is enumerated, so KL(pi || pi*), E_pi[r] and KL(pi || pi_ref) are exact (float64).

The problem: maximise J(pi) = E_pi[r(y)] - beta KL(pi || pi_ref). Its optimum is
pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, and J(pi) = beta log Z - beta KL(pi || pi*).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class SequenceSpace:
    """All V^T token sequences and, per sequence and position, the table row of its prefix."""

    vocab: int
    length: int

    @property
    def n_rows(self) -> int:
        """Number of prefixes (table rows)."""
        return sum(self.vocab**t for t in range(self.length))

    @property
    def n_sequences(self) -> int:
        return self.vocab**self.length

    @cached_property
    def sequences(self) -> torch.Tensor:
        """All sequences in lexicographic order, [N, T]; row i encodes i in base V."""
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] table row of the prefix tokens[:, :t] at each position t."""
        rows = torch.zeros_like(tokens)
        offset, code = 0, torch.zeros(tokens.shape[0], dtype=torch.long)
        for t in range(self.length):
            rows[:, t] = offset + code
            offset += self.vocab**t
            code = code * self.vocab + tokens[:, t]
        return rows

    def index(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] index of each sequence in ``sequences`` (its base-V code)."""
        weights = self.vocab ** torch.arange(self.length - 1, -1, -1)
        return (tokens * weights).sum(-1)

    def sample(self, table: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
        """[batch, T] sequences drawn from the policy ``table`` (no gradient)."""
        tokens = torch.zeros(batch, self.length, dtype=torch.long)
        offset, code = 0, torch.zeros(batch, dtype=torch.long)
        probs = table.detach().softmax(-1)
        for t in range(self.length):
            tokens[:, t] = torch.multinomial(probs[offset + code], 1, generator=gen).squeeze(-1)
            offset += self.vocab**t
            code = code * self.vocab + tokens[:, t]
        return tokens


def sequence_logprobs(space: SequenceSpace, table: torch.Tensor) -> torch.Tensor:
    """log pi(y) for every sequence in ``space.sequences``, [N]."""
    tokens = space.sequences
    return token_logprobs(table, space.rows(tokens), tokens).sum(-1)


def gathered_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., token]`` for ``[..., V]`` logits and ``[...]`` tokens: the tabular
    studies' torch-only twin of ``lmgym.task.log_prob`` (which would load transformers)."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(table: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] log-probability of each token given its prefix under the policy ``table``."""
    return gathered_logprobs(table[rows], tokens)


@dataclass(frozen=True)
class Instance:
    """One problem: a random reference policy, a random sequence reward, and beta."""

    space: SequenceSpace
    ref_table: torch.Tensor
    reward: torch.Tensor
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"V{self.space.vocab}-T{self.space.length}-b{self.beta:g}-s{self.seed}"

    def optimum_logprobs(self) -> torch.Tensor:
        """log pi*(y) = log pi_ref(y) + r(y)/beta - log Z, [N]."""
        unnormalised = sequence_logprobs(self.space, self.ref_table) + self.reward / self.beta
        return unnormalised - unnormalised.logsumexp(0)

    def optimum_table(self) -> torch.Tensor:
        """A logit table of pi*: row s = log pi_ref(.|s) + log W(s, .), W the soft value.

        log W(y) = r(y)/beta for complete sequences and, backwards over t,
        log W(y_<t) = logsumexp_v [log pi_ref(v|y_<t) + log W(y_<t, v)], so that
        pi*(v|y_<t) = pi_ref(v|y_<t) W(y_<t, v) / W(y_<t) and prod_t pi*(y_t|y_<t) = pi*(y).
        """
        space, ref_logp = self.space, self.ref_table.log_softmax(-1)
        log_w = self.reward / self.beta  # over complete sequences, in base-V order
        table = torch.empty_like(self.ref_table)
        for t in reversed(range(space.length)):
            offset = sum(space.vocab**k for k in range(t))
            rows = slice(offset, offset + space.vocab**t)
            table[rows] = ref_logp[rows] + log_w.reshape(space.vocab**t, space.vocab)
            log_w = table[rows].logsumexp(-1)
        return table

    def metrics(self, table: torch.Tensor) -> dict[str, float]:
        """Exact KL(pi || pi*), E_pi[r], KL(pi || pi_ref) and J of the policy ``table``."""
        with torch.no_grad():
            logp = sequence_logprobs(self.space, table)
            p = logp.exp()
            ref_logp = sequence_logprobs(self.space, self.ref_table)
            kl_opt = float((p * (logp - self.optimum_logprobs())).sum())
            reward = float((p * self.reward).sum())
            kl_ref = float((p * (logp - ref_logp)).sum())
        return {
            "kl_to_opt": kl_opt,
            "reward": reward,
            "kl_to_ref": kl_ref,
            "objective": reward - self.beta * kl_ref,
        }


def make_instance(vocab: int, length: int, beta: float, seed: int, logit_scale: float = 1.0) -> Instance:
    """pi_ref logits ~ N(0, logit_scale^2) per table entry and r(y) ~ N(0, 1) per sequence."""
    space = SequenceSpace(vocab, length)
    gen = torch.Generator().manual_seed(seed)
    ref_table = logit_scale * torch.randn(space.n_rows, vocab, generator=gen, dtype=torch.float64)
    reward = torch.randn(space.n_sequences, generator=gen, dtype=torch.float64)
    return Instance(space, ref_table, reward, beta, seed)
