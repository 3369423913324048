"""IMDBContinuation: continue a movie-review prompt one token at a time, rewarded for positive sentiment.

Observation: the prompt and the tokens generated so far, left-padded to
``max_prompt_tokens + max_new_tokens`` (``input_ids`` and ``attention_mask``).
Action: the next token id. An episode terminates when the agent writes EOS and is truncated after
``max_new_tokens`` tokens. The reward is 0 until the last step, where it is the reward model's
score of the continuation.

``info`` after ``reset`` and every ``step``:

- ``ref_logits``: float32 ``(vocab,)`` next-token logits of the frozen reference model at the
  returned observation, so an agent can compute any KL estimator against ``pi_ref``;
- ``ref_logprob`` (``step`` only): ``log pi_ref(action | previous observation)``;
- ``prompt`` (``reset`` and the last step), ``continuation`` and ``sentiment`` (last step).

``action_masks()`` (sb3-contrib's convention): bool ``(vocab,)``, True where a token is allowed at
the current observation: the top-k / top-p tokens of the masking distribution (``mask_top_k``,
``mask_top_p``; the reference model's by default, or ``mask_model`` / ``mask_logits_fn``: see
``lmgym.masks``). Without ``mask_top_k`` and ``mask_top_p`` every token is allowed. ``step``
does not enforce the mask: the agent samples within it.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from lmgym.decoding import IncrementalDecoder
from lmgym.masks import ActionMasker, LogitsFn
from lmgym.task import log_prob
from lmgym.tasks import make_task


class IMDBContinuationEnv(gym.Env):
    """One episode at a time: ``gym.make("IMDBContinuation-v0", **kwargs)`` (the module docstring
    describes the spaces, the reward and ``info``).

    Args:
        render_mode: None or ``"ansi"`` (the prompt and the continuation so far, as text).
        mask_top_k: allow only the top-k tokens of the masking distribution (``action_masks()``), or None.
        mask_top_p: allow only its top-p nucleus, or None.
        mask_model: the masking model (default: the reference model).
        mask_logits_fn: a function giving the masking logits instead of a model.
        task: a registered task's name (``lmgym.tasks``; default ``"imdb"``).
        **task_kwargs: the task factory's arguments; for ``"imdb"``, those of ``lmgym.task.ContinuationTask``:
            model: the tokenizer's and, unless ``ref_model`` is given, the reference model: ``"smollm2-135m"``
                (embedded), a local folder, a Hub id or a loaded ``PreTrainedModel``.
            ref_model: the frozen reference pi_ref (same vocabulary as ``model``); None: ``model``.
            tokenizer: a tokenizer to use instead of ``model``'s.
            reward: ``"vader"``, a sequence classifier (local folder or Hub id), or a callable
                ``list[str] -> array`` of scores.
            positive_label: the classifier's positive class.
            dataset: ``"bundled"``, ``"stanfordnlp/imdb"``, or a local csv/json/parquet with a ``text`` column.
            split: ``"train"`` or ``"test"`` (for bundled and local files, test is every 10th prompt).
            prompts: a list of prompts, instead of ``dataset``.
            max_prompt_tokens: prompts are truncated to this many tokens.
            max_new_tokens: the episode length limit.
            device: where the reference model runs.

    Raises:
        ValueError: an unknown ``render_mode``, a bad mask option or a vocabulary mismatch.
        lmgym.assets.AssetUnavailableError: a model, reward or data set cannot be loaded.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        render_mode: str | None = None,
        mask_top_k: int | None = None,
        mask_top_p: float | None = None,
        mask_model: torch.nn.Module | None = None,
        mask_logits_fn: LogitsFn | None = None,
        task: str = "imdb",
        **task_kwargs,
    ):
        self.masker = ActionMasker(mask_top_k, mask_top_p, mask_model, mask_logits_fn)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.task = make_task(task, **task_kwargs)
        self.observation_space = self.task.observation_space
        self.action_space = self.task.action_space
        self.decoder = IncrementalDecoder(self.task.ref_model)
        self.prompt = ""
        self.tokens: list[int] = []
        self.generated: list[int] = []
        self.ref_logits: torch.Tensor | None = None
        self.done = True

    def _obs(self) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.task.observation([self.tokens]).items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.prompt, self.tokens = self.task.sample_prompt(self.np_random)
        self.generated = []
        self.ref_logits = self.decoder.prefill(*self.task.batch([self.tokens])).logits[0]
        self.done = False
        return self._obs(), {"ref_logits": self.ref_logits.cpu().numpy(), "prompt": self.prompt}

    def step(self, action):
        if self.done:
            raise RuntimeError("the episode has ended: call reset() before step()")
        action = self.task.check_action(action)
        ref_logprob = log_prob(self.ref_logits, torch.tensor(action)).item()
        self.tokens.append(action)
        self.generated.append(action)
        self.ref_logits = self.decoder.append(torch.tensor([action])).logits[0]
        terminated, truncated = self.task.episode_end(action, len(self.generated))
        self.done = terminated or truncated
        reward = 0.0
        info = {"ref_logits": self.ref_logits.cpu().numpy(), "ref_logprob": ref_logprob}
        if self.done:
            continuation = self.task.decode(self.generated)
            reward = float(self.task.score([continuation])[0])
            info.update(prompt=self.prompt, continuation=continuation, sentiment=reward)
        return self._obs(), reward, terminated, truncated, info

    @property
    def masks_actions(self) -> bool:
        """Whether ``action_masks()`` restricts the actions (built with ``mask_top_k`` / ``mask_top_p``)."""
        return bool(self.masker.enabled)

    def action_masks(self) -> np.ndarray:
        """The tokens allowed at the current observation (module docstring).

        Returns:
            bool ``(vocab,)``, True where a token is allowed.
        """
        if self.ref_logits is None:
            raise RuntimeError("call reset() before action_masks()")
        if not self.masker.enabled:
            return np.ones(self.action_space.n, dtype=bool)
        if self.masker.uses_reference:
            logits = self.ref_logits[None]
        else:
            logits = self.masker.masking_logits(*self.task.batch([self.tokens]))
        return self.masker.masks(logits)[0].cpu().numpy()

    def render(self):
        if self.render_mode == "ansi":
            return self.prompt + self.task.decode(self.generated)
        return None
