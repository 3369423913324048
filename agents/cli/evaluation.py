"""Held-out evaluation: sentiment, perplexity under the reference model, distinct-n diversity."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agents.metrics import EVAL_DISTINCT_1, EVAL_DISTINCT_2, EVAL_PERPLEXITY, EVAL_SENTIMENT
from agents.policy import CausalLMPolicy
from agents.rollout.reference import Reference
from agents.rollout.sampling import sample_episodes, trim_left_padding
from agents.vec_env import LMGymVecEnv


@dataclass
class EvalResult:
    sentiment: float  # mean reward-model score of the continuations
    perplexity: float  # exp(-mean log pi_ref(token)) over all generated tokens
    distinct_1: float
    distinct_2: float
    prompts: list[str]
    continuations: list[str]

    def metrics(self) -> dict[str, float]:
        return {
            EVAL_SENTIMENT: self.sentiment,
            EVAL_PERPLEXITY: self.perplexity,
            EVAL_DISTINCT_1: self.distinct_1,
            EVAL_DISTINCT_2: self.distinct_2,
        }


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over the whole set (0 if there are none)."""
    ngrams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def evaluate(policy: CausalLMPolicy, env: LMGymVecEnv, reference: Reference, seed: int = 12345, sampler: str = "inverse-cdf") -> EvalResult:
    """One sampled continuation per sub-env of ``env`` (held-out prompts, fixed ``seed`` so that
    successive evaluations see the same prompts), drawn with ``sampler`` (``sample_episodes``);
    the perplexity is under ``reference``."""
    policy.set_training_mode(False)
    env.seed(seed)
    obs = env.reset()
    prompt_ids, prompt_mask = trim_left_padding(obs["input_ids"], obs["attention_mask"])
    n = env.num_envs
    prompts: list[str] = [""] * n
    continuations: list[str] = [""] * n
    sentiments = torch.zeros(n)
    ref_logprob_sum, n_tokens = 0.0, 0
    for step in sample_episodes(policy, env, reference, prompt_ids, prompt_mask, env.max_new_tokens, sampler=sampler):
        ref_logprob_sum += float((step.ref_logprobs * step.active).sum())
        n_tokens += int(step.active.sum())
        for i in torch.nonzero(step.active & torch.as_tensor(step.dones)).flatten().tolist():
            prompts[i] = str(step.infos[i]["prompt"])
            continuations[i] = str(step.infos[i]["continuation"])
            sentiments[i] = float(step.infos[i]["sentiment"])
    return EvalResult(
        sentiment=float(sentiments.mean()),
        perplexity=math.exp(-ref_logprob_sum / max(n_tokens, 1)),
        distinct_1=distinct_n(continuations, 1),
        distinct_2=distinct_n(continuations, 2),
        prompts=prompts,
        continuations=continuations,
    )
