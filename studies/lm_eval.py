"""Held-out evaluation of a policy LM against its reference: one sampled continuation per prompt.

Every prompt x is used exactly once (in order, in batches). A continuation y ~ pi(. | x) of at
most ``task.max_new_tokens`` tokens is sampled from the full softmax (stopping at EOS) with a
generator seeded by ``seed``, so two policies are compared on the same prompts and, where they
agree, the same samples. Per prompt:

- sentiment: the task's reward model on y (VADER compound in [-1, 1] by default);
- kl = sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)), the exact KL at each visited position
  (``kl_estimators.analytic``) summed over y; its expectation over y is the sequence KL
  KL(pi(. | x) || pi_ref(. | x));
- nll = -sum_t log pi_ref(y_t | x, y_<t) and the number of tokens, for the perplexity of the
  continuations under the reference, exp(sum nll / sum tokens) over the whole set.

distinct-n is over the whole set (unique word n-grams / all word n-grams).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

import kl_estimators
from agents.cli.evaluation import distinct_n
from lmgym.decoding import DecoderOutput, decode_in_lockstep
from lmgym.task import ContinuationTask, log_prob


@dataclass
class HeldOutScores:
    prompts: list[str]
    continuations: list[str]
    sentiment: np.ndarray  # [P]
    kl: np.ndarray  # [P] nats per sequence
    nll: np.ndarray  # [P] -sum_t log pi_ref(y_t | ...)
    n_tokens: np.ndarray  # [P]

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum()) / max(int(self.n_tokens.sum()), 1))

    def distinct(self, n: int) -> float:
        return distinct_n(self.continuations, n)


@torch.no_grad()
def _sample_batch(
    policy_lm: PreTrainedModel, task: ContinuationTask, prompts: list[str], generator: torch.Generator
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled continuation ids, and per-prompt summed KL, reference NLL and token count."""
    tokens = [task.tokenizer(prompt)["input_ids"][-task.max_prompt_tokens :] for prompt in prompts]
    ids, mask = task.batch(tokens)
    n = len(prompts)
    kl, nll, n_tokens = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    generated: list[list[int]] = [[] for _ in range(n)]

    def sample(outputs: list[DecoderOutput]) -> torch.Tensor:
        return torch.multinomial(outputs[0].logits.float().cpu().softmax(-1), 1, generator=generator).squeeze(-1)

    steps = decode_in_lockstep([policy_lm, task.ref_model], ids, mask, task.max_new_tokens, task.eos_id, sample)
    for (policy_out, ref_out), actions, active in steps:
        logits, ref_logits = policy_out.logits.float().cpu(), ref_out.logits.float().cpu()
        on = active.float()
        kl += kl_estimators.analytic(logits, ref_logits) * on
        nll -= log_prob(ref_logits, actions) * on
        n_tokens += on
        for i in torch.nonzero(active).flatten().tolist():
            generated[i].append(int(actions[i]))
    return generated, kl, nll, n_tokens


def evaluate_held_out(
    policy_lm: PreTrainedModel, task: ContinuationTask, prompts: list[str], seed: int, batch_size: int = 64
) -> HeldOutScores:
    """Sample and score one continuation per prompt (see the module docstring)."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    policy_lm.eval()
    generator = torch.Generator().manual_seed(seed)
    continuations: list[str] = []
    kl, nll, n_tokens = [], [], []
    for start in range(0, len(prompts), batch_size):
        ids, batch_kl, batch_nll, batch_tokens = _sample_batch(policy_lm, task, prompts[start : start + batch_size], generator)
        continuations += [task.decode(row) for row in ids]
        kl.append(batch_kl)
        nll.append(batch_nll)
        n_tokens.append(batch_tokens)
    return HeldOutScores(
        prompts=list(prompts),
        continuations=continuations,
        sentiment=task.score(continuations).astype(np.float64),
        kl=torch.cat(kl).double().numpy(),
        nll=torch.cat(nll).double().numpy(),
        n_tokens=torch.cat(n_tokens).long().numpy(),
    )
