"""The IMDB continuation task shared by the single and the vector env.

A ``ContinuationTask`` owns everything model-specific the envs need: the frozen reference LM, the
tokenizer (whose ids are the actions), the reward model and the prompt set; it validates the
configuration, tokenises prompts and lays sequences out as left-padded observations.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gymnasium import spaces
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmgym.assets import EMBEDDED_LM, load_causal_lm, load_config, load_tokenizer
from lmgym.prompts import BUNDLED, load_prompts
from lmgym.rewards import VADER, make_reward_model


def output_vocab_size(model: PreTrainedModel) -> int:
    """Number of next-token logits ``model`` produces."""
    return model.get_output_embeddings().weight.shape[0]


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, length]`` int64 ``(input_ids, attention_mask)`` with each sequence right-aligned."""
    input_ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, -len(tokens) :] = tokens
            attention_mask[row, -len(tokens) :] = 1
    return input_ids, attention_mask


class ContinuationTask:
    """Assets and conventions of the task.

    Args:
        model: policy LM spec (see ``lmgym.assets``) or a loaded model; only its vocabulary size is
            read (its tokenizer is the default tokenizer, its weights are the default reference).
        ref_model: reference LM spec or loaded model, default ``model``. A spec is loaded on
            ``device``, frozen, in eval mode; a loaded model is used as given (put it in eval mode).
        tokenizer: a loaded tokenizer, default the tokenizer of ``model``.
        reward: ``"vader"``, a text-classification model id/path, or a callable
            ``list[str] -> np.ndarray``.
        positive_label: index of the positive class of a classifier reward.
        dataset: prompt set (see ``lmgym.prompts.load_prompts``); ignored if ``prompts``.
        split: ``"train"``, ``"test"`` or ``"heldout"`` part of ``dataset``; ignored if ``prompts``.
        prompts: explicit list of prompts.
        max_prompt_tokens: prompts are truncated from the left to this many tokens.
        max_new_tokens: an episode is truncated after this many generated tokens.
        device: device of the reference (and classifier reward) model.
    """

    def __init__(
        self,
        model: str | PreTrainedModel = EMBEDDED_LM,
        ref_model: str | PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward: str | Callable[[list[str]], np.ndarray] = VADER,
        positive_label: int = 1,
        dataset: str = BUNDLED,
        split: str = "train",
        prompts: Sequence[str] | None = None,
        max_prompt_tokens: int = 64,
        max_new_tokens: int = 48,
        device: str | torch.device = "cpu",
    ):
        if max_prompt_tokens < 1 or max_new_tokens < 1:
            raise ValueError(
                f"max_prompt_tokens and max_new_tokens must be >= 1, got {max_prompt_tokens} and {max_new_tokens}"
            )
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.prompts = list(prompts) if prompts is not None else load_prompts(dataset, split=split)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("the prompt set must be a non-empty list of non-blank strings")

        policy_name = model if isinstance(model, str) else getattr(model, "name_or_path", "model")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(policy_name)
        policy_is_ref = ref_model is None or ref_model is model
        if policy_is_ref:
            ref_model = model
        if isinstance(ref_model, str):
            ref_model, _ = load_causal_lm(ref_model, device=device)
            ref_model.requires_grad_(False)
        self.ref_model = ref_model

        self.vocab_size = output_vocab_size(self.ref_model)
        policy_vocab = self.vocab_size if policy_is_ref else self._policy_vocab_size(model)
        if policy_vocab != self.vocab_size:
            raise ValueError(
                f"the reference model has {self.vocab_size} output logits but the policy model has a "
                f"vocabulary of {policy_vocab}: they must share a tokenizer"
            )
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens, more than the {self.vocab_size} logits")
        self.eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

        self.reward_model = make_reward_model(reward, positive_label, device) if isinstance(reward, str) else reward

        length = self.max_prompt_tokens + self.max_new_tokens
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, (length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (length,), np.int64),
            }
        )
        self.action_space = spaces.Discrete(self.vocab_size)

    @staticmethod
    def _policy_vocab_size(model: str | PreTrainedModel) -> int:
        if isinstance(model, PreTrainedModel):
            return output_vocab_size(model)
        return load_config(model).vocab_size

    def sample_prompt(self, np_random: np.random.Generator) -> tuple[str, list[int]]:
        """A prompt drawn uniformly, and its token ids truncated from the left to ``max_prompt_tokens``."""
        prompt = self.prompts[int(np_random.integers(len(self.prompts)))]
        token_ids = self.tokenizer(prompt)["input_ids"][-self.max_prompt_tokens :]
        if not token_ids:
            raise ValueError(f"the prompt {prompt!r} tokenizes to no tokens")
        return prompt, list(token_ids)

    def check_action(self, action) -> int:
        """``action`` as an int, or a ValueError if it is not an integer token id (floats such as
        3.0 and booleans are refused: they are not token ids, even when they convert to one)."""
        try:
            token = operator.index(action)
        except TypeError:
            token = None
        if token is None or isinstance(action, (bool, np.bool_)) or not 0 <= token < self.vocab_size:
            raise ValueError(f"action {action!r} is not an integer token id in [0, {self.vocab_size})")
        return token

    def observation(self, sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """``[N, max_prompt_tokens + max_new_tokens]`` left-padded observation of N sequences."""
        input_ids, attention_mask = left_pad(sequences, self.max_prompt_tokens + self.max_new_tokens, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batch(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` tensors as short as the longest sequence."""
        input_ids, attention_mask = left_pad(sequences, max(map(len, sequences)), self.pad_id)
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def episode_end(self, action: int, num_generated: int) -> tuple[bool, bool]:
        """``(terminated, truncated)`` after generating ``action`` as the ``num_generated``-th token."""
        terminated = action == self.eos_id
        return terminated, not terminated and num_generated >= self.max_new_tokens

    def score(self, continuations: list[str]) -> np.ndarray:
        """Reward-model scores of finished continuations, as float32."""
        return np.asarray(self.reward_model(continuations), dtype=np.float32).reshape(len(continuations))


def log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., action]`` for ``[..., V]`` logits and ``[...]`` actions."""
    return logits.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
