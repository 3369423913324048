"""IMDBContinuation as a truly batched vector env: one reference-model forward per step for all envs.

The N sequences are decoded together by an ``IncrementalDecoder`` whose KV cache is carried across
steps, so a step costs one forward of length 1. When some sub-envs start a new episode, only their
new prompts are encoded and spliced into the cache (``IncrementalDecoder.replace_rows``); the other
rows keep theirs.

Autoreset (``autoreset_mode``, Gymnasium's conventions, https://farama.org/Vector-Autoreset-Mode):

- ``NEXT_STEP`` (default): the step after a sub-env finished resets it; its action is ignored,
  its reward is 0 and its ``ref_logprob`` is 0.
- ``SAME_STEP``: a finishing sub-env is reset within the step; the returned observation is the new
  episode's first one and the finishing observation and info are in ``info["final_obs"]`` and
  ``info["final_info"]``.

Infos are dicts of arrays with ``_key`` masks: ``ref_logits`` (N, vocab) float32 at the returned
observations and ``ref_logprob`` (N,) of the actions just taken are present for every sub-env;
``prompt`` for sub-envs that started an episode (its new prompt) or finished one (the finished
episode's prompt, as in the single env); ``continuation`` and ``sentiment`` for sub-envs that
finished an episode. In ``SAME_STEP`` mode the finished episode's keys are inside ``final_info``.
A finishing step in ``SAME_STEP`` mode costs one cached forward and one encode of the new prompts.

``step_ref_logits=False``: for callers that need pi_ref only over whole sequences (an agent that
scores its rollout after sampling, like PPOKL), the env runs no reference forward at all and its
infos carry neither ``ref_logits`` nor ``ref_logprob``; ``reference_logits`` gives pi_ref's logits
over a batch of sequences in one forward.

``action_masks()`` (sb3-contrib's convention): bool ``(N, vocab)``, row i the tokens allowed at
sub-env i's current observation, from ``mask_top_k`` / ``mask_top_p`` of the reference model's
logits (computed by one reference forward when ``step_ref_logits=False``) or of ``mask_model`` /
``mask_logits_fn`` (``lmgym.masks``); all True without ``mask_top_k`` and ``mask_top_p``.

Seeding: ``reset(seed=s)`` seeds one generator (``self.np_random``) from which all sub-envs draw
their prompts in order, so a seed fixes the whole sequence of prompts.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from lmgym.decoding import IncrementalDecoder, sequence_logits
from lmgym.masks import ActionMasker, LogitsFn, next_token_logits
from lmgym.task import log_prob
from lmgym.tasks import make_task


class IMDBContinuationVectorEnv(VectorEnv):
    """``num_envs`` episodes at once, truly batched: ``gym.make_vec("IMDBContinuation-v0", num_envs,
    vectorization_mode="vector_entry_point", **kwargs)``. One reference forward per step for the
    whole batch, with the KV cache carried across steps; ``infos`` are dicts of arrays.

    Args:
        num_envs: the number of sub-envs, >= 1.
        autoreset_mode: ``NEXT_STEP`` (Gymnasium's default) or ``SAME_STEP`` (what SB3 and PPOKL expect).
        render_mode: None or ``"ansi"``.
        step_ref_logits: put pi_ref's logits and log-probs in every step's info (False saves the
            reference forward when the agent computes them itself).
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
        ValueError: ``num_envs`` < 1, an unknown autoreset or render mode, or a bad mask option.
        lmgym.assets.AssetUnavailableError: a model, reward or data set cannot be loaded.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
        step_ref_logits: bool = True,
        mask_top_k: int | None = None,
        mask_top_p: float | None = None,
        mask_model: torch.nn.Module | None = None,
        mask_logits_fn: LogitsFn | None = None,
        task: str = "imdb",
        **task_kwargs,
    ):
        self.masker = ActionMasker(mask_top_k, mask_top_p, mask_model, mask_logits_fn)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or SAME_STEP, got {autoreset_mode}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.num_envs = num_envs
        self.autoreset_mode = autoreset_mode
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.render_mode = render_mode
        self.step_ref_logits = bool(step_ref_logits)
        self.task = make_task(task, **task_kwargs)
        self.single_observation_space = self.task.observation_space
        self.single_action_space = self.task.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.decoder = IncrementalDecoder(self.task.ref_model)
        self.prompts = [""] * num_envs
        self.tokens: list[list[int]] = [[] for _ in range(num_envs)]
        self.num_generated = np.zeros(num_envs, dtype=np.int64)
        self.needs_reset = np.zeros(num_envs, dtype=bool)
        self.ref_logits: torch.Tensor | None = None
        self.started = False

    def _generated(self, i: int) -> list[int]:
        return self.tokens[i][len(self.tokens[i]) - self.num_generated[i] :]

    def _start_episodes(self, envs: np.ndarray, infos: dict) -> dict:
        """Draw new prompts for the sub-envs where ``envs`` is True and encode only those."""
        rows = np.flatnonzero(envs)
        for i in rows:
            self.prompts[i], self.tokens[i] = self.task.sample_prompt(self.np_random)
            self.num_generated[i] = 0
            infos = self._add_info(infos, {"prompt": self.prompts[i]}, i)
        if not self.step_ref_logits:
            return infos
        if envs.all() or not self.decoder.can_replace_rows:
            self.ref_logits = self.decoder.prefill(*self.task.batch(self.tokens)).logits
        else:
            index = torch.from_numpy(rows).to(self.ref_logits.device)
            new = self.decoder.replace_rows(index, *self.task.batch([self.tokens[i] for i in rows])).logits
            self.ref_logits = self.ref_logits.index_copy(0, index, new)  # not in place: infos hold views
        return infos

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.needs_reset[:] = False
        self.started = True
        infos = self._start_episodes(np.ones(self.num_envs, dtype=bool), {})
        if self.step_ref_logits:
            infos["ref_logits"] = self.ref_logits.cpu().numpy()
        return self.task.observation(self.tokens), infos

    @property
    def reference_model(self) -> torch.nn.Module:
        """pi_ref, the frozen model behind ``info["ref_logits"]`` (and the default masking model)."""
        return self.task.ref_model

    @property
    def tokenizer(self):
        """The tokenizer whose ids are the actions."""
        return self.task.tokenizer

    @property
    def reward_model(self):
        """The reward model that scores finished continuations."""
        return self.task.reward_model

    @property
    def max_new_tokens(self) -> int:
        """The most tokens an episode generates."""
        return int(self.task.max_new_tokens)

    @property
    def masks_actions(self) -> bool:
        """Whether ``action_masks()`` restricts the actions (built with ``mask_top_k`` / ``mask_top_p``)."""
        return bool(self.masker.enabled)

    def set_reference_model(self, model: torch.nn.Module) -> None:
        """Use ``model`` as pi_ref from the next reset on (e.g. a LoRA policy's base, shared instead
        of a second copy)."""
        self.task.ref_model = model
        self.decoder = IncrementalDecoder(model)

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """float32 ``[B, n, V]``: pi_ref's next-token logits for the last ``n`` tokens of each row
        (``lmgym.decoding.sequence_logits``)."""
        return sequence_logits(self.task.ref_model, input_ids, attention_mask, n)

    def step(self, actions):
        if not self.started:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions).reshape(self.num_envs)
        restarting, active = self.needs_reset, ~self.needs_reset
        actions = np.array([self.task.check_action(a) if on else self.task.pad_id for a, on in zip(actions, active)])
        self.needs_reset = np.zeros(self.num_envs, dtype=bool)
        for i in np.flatnonzero(active):
            self.tokens[i].append(int(actions[i]))
        self.num_generated[active] += 1

        infos: dict = {}
        if self.step_ref_logits:
            action_ids = torch.from_numpy(actions).to(self.ref_logits.device)
            ref_logprob = np.where(active, log_prob(self.ref_logits, action_ids).cpu().numpy(), 0.0).astype(np.float32)
            if not restarting.all():
                self.ref_logits = self.decoder.append(action_ids).logits  # restarting rows are replaced next
        if restarting.any():
            infos = self._start_episodes(restarting, infos)
        ended = [self.task.episode_end(int(a), n) for a, n in zip(actions, self.num_generated)]
        terminated = active & np.array([t for t, _ in ended])
        truncated = active & np.array([t for _, t in ended])
        done = terminated | truncated
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        if self.step_ref_logits:
            infos.update(ref_logits=self.ref_logits.cpu().numpy(), ref_logprob=ref_logprob)
        observations = self.task.observation(self.tokens)
        if not done.any():
            return observations, rewards, terminated, truncated, infos

        finished = np.flatnonzero(done)
        continuations = [self.task.decode(self._generated(i)) for i in finished]
        rewards[finished] = self.task.score(continuations)
        endings = {
            i: {"prompt": self.prompts[i], "continuation": text, "sentiment": float(rewards[i])}
            for i, text in zip(finished, continuations)
        }
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self.needs_reset = done
            for i, ending in endings.items():
                infos = self._add_info(infos, ending, i)
            return observations, rewards, terminated, truncated, infos

        for i, ending in endings.items():
            final_obs = {key: value[i] for key, value in observations.items()}
            final_info = dict(ending)
            if self.step_ref_logits:
                final_info.update(ref_logits=infos["ref_logits"][i], ref_logprob=float(infos["ref_logprob"][i]))
            infos = self._add_info(infos, {"final_obs": final_obs, "final_info": final_info}, i)
        infos = self._start_episodes(done, infos)
        if self.step_ref_logits:
            infos["ref_logits"] = self.ref_logits.cpu().numpy()
        return self.task.observation(self.tokens), rewards, terminated, truncated, infos

    def action_masks(self) -> np.ndarray:
        """The tokens allowed at each sub-env's current observation.

        Returns:
            bool ``(N, vocab)``, True where a token is allowed.
        """
        if not self.started:
            raise RuntimeError("call reset() before action_masks()")
        if not self.masker.enabled:
            return np.ones((self.num_envs, self.single_action_space.n), dtype=bool)
        if not self.masker.uses_reference:
            logits = self.masker.masking_logits(*self.task.batch(self.tokens))
        elif self.step_ref_logits:
            logits = self.ref_logits
        else:
            logits = next_token_logits(self.task.ref_model, *self.task.batch(self.tokens))
        return self.masker.masks(logits).cpu().numpy()

    def render(self):
        if self.render_mode == "ansi":
            return tuple(self.prompts[i] + self.task.decode(self._generated(i)) for i in range(self.num_envs))
        return None
