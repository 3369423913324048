"""PPOKL: stable-baselines3 PPO for token-level text generation with exact KL handling.

Only what text generation changes is overridden: ``collect_rollouts`` (batched sampling with the
policy's KV cache, one episode per env, reference logits from the env) and ``train`` (a PPO
update over whole sequences with the KL terms of ``kl_estimators``); ``save`` and ``load`` keep
SB3's signatures but use the pickle-free format of ``agents.state.checkpoint`` (via
``agents.state.training_state``). ``learn``,
``predict``, callbacks and the logger are SB3's own.

KL handling (beta = ``kl_coef``):
- ``kl_reward``: per-token reward r_t = -beta KL_t with KL_t one of k1/k2/k3 (sampled log-ratio
  estimates) or ``analytic`` (exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the vocabulary), or none.
- ``analytic_grad``: the current token's KL is taken out of its advantage and the exact
  per-position KL is added to the loss, beta * mean_t KL_t(theta), and differentiated directly.
  With ``kl_reward="analytic"`` this is the unbiased ``analytic-future`` estimator of
  ``kl_estimators`` (exactly so for gamma = lambda = 1).
- ``ref_logits``: ``"store"`` keeps pi_ref's [N, T, V] logits from the rollout; ``"recompute"``
  recomputes them per minibatch in ``train``; ``"hidden"`` keeps pi_ref's [N, T, d] final hidden
  states and computes every vocabulary-wide term of the update with ``kl_estimators.fused_kl``, so
  no [b, T, V] logits exist (``agents.rollout.reference`` gives the memory formulas).
- ``kl_loss``: GRPO-style autodiff of a sampled estimate (k1/k2/k3-loss), for study; their biases
  are documented in ``kl_estimators.gradients``.

Action masks (``agents.rollout.masking``): with ``mask_top_k`` / ``mask_top_p`` PPOKL is NLPO: at each
step only the top-k / top-p tokens of a frozen masking policy (a copy of the policy, re-synced at
the start of every ``mask_sync_every``-th iteration) may be sampled; an env with its own
``action_masks()`` (lmgym's ``mask_top_k`` / ``mask_top_p``) is honoured the same way. The policy
that writes is the masked pi^M (logits -inf outside the mask): it samples the actions, the masks
are stored per position and re-applied in ``train``, so the ratios, the entropy and every KL term
are those of pi^M, and the analytic KL is KL(pi^M || pi_ref) over the allowed tokens.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HumanOutputFormat, Logger
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.vec_env import VecEnv

import kl_estimators
from agents.metrics import (
    CLIP_RANGE,
    EXPLAINED_VARIANCE,
    GEN_LENGTH,
    KL_ANALYTIC,
    KL_COEF,
    KL_IN_REWARD,
    LEARNING_RATE,
    MASK_TOKENS,
    N_UPDATES,
    ROLLOUT_TOKENS_PER_S,
    TASK_REWARD,
    TRAIN_PREFIX,
    TRAIN_SECONDS,
)
from agents import distributed
from agents.rollout.buffer import SequenceBatch, SequenceRolloutBuffer
from agents.rollout.masking import EnvMasks, NucleusMasks, env_masks_enabled, frozen_copy, masked_entropy, masked_logits, sync_masking_policy
from agents.options import UNSTORED_ARGUMENTS, check_options
from agents.state.fingerprint import weights_fingerprint
from agents.policy import CausalLMPolicy
from agents.rollout.reference import Reference, linear_logits
from agents.rollout.sampling import sample_episodes, trim_left_padding
from agents.state.training_state import check_finite, load_ppokl, save_ppokl
from agents.vec_env import LMGymVecEnv

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class PPOKL(PPO):
    """PPO with a KL penalty to a frozen reference model, for ``lmgym`` text environments.

    ``batch_size`` counts tokens (transitions) as in SB3 and is rounded to whole sequences;
    ``n_steps`` is the env's ``max_new_tokens`` (a rollout is one episode per env).
    ``target_kl`` keeps SB3's meaning (early stopping on approx KL); the adaptive KL controller's
    target is ``kl_target``.

    Args:
        policy: ``"CausalLMPolicy"`` or the class itself.
        env: an lmgym vector env (``gym.make_vec(..., vectorization_mode="vector_entry_point",
            autoreset_mode=AutoresetMode.SAME_STEP)``), an ``LMGymVecEnv``, or None (set later, e.g. by ``load``).
        learning_rate: the policy's learning rate, or a schedule of the remaining progress (SB3).
        n_steps: tokens per env per rollout; None takes the env's ``max_new_tokens`` (one episode per env).
        batch_size: tokens per minibatch, rounded to whole sequences.
        n_epochs: optimisation passes over each rollout (more than one makes the update off-policy).
        gamma: the discount factor.
        gae_lambda: GAE's lambda.
        clip_range: PPO's ratio clip epsilon, or a schedule.
        clip_range_vf: the value function's clip, or None for no clipping (SB3).
        normalize_advantage: normalise advantages per minibatch (SB3).
        ent_coef: the entropy bonus coefficient.
        vf_coef: the value loss coefficient.
        max_grad_norm: the gradient norm clip.
        target_kl: SB3's early stopping: stop the epochs when the approximate KL to the rollout policy
            exceeds it (not the KL to the reference model); None disables it.
        kl_coef: beta, the KL coefficient (the initial one when ``kl_target`` is set).
        kl_target: the target of the adaptive KL controller (the exact KL to the reference per
            sequence, the rollout's mean), or None for a fixed beta.
        kl_horizon: the adaptive controller's horizon, in sequences (each iteration advances it by
            the number of episodes collected).
        kl_reward: the KL in the per-token reward, r_t -= beta KL_t: ``"k1"``, ``"k2"``, ``"k3"``,
            ``"analytic"`` (exact) or ``"none"``.
        analytic_grad: take the current token's KL out of its advantage and add the exact KL to the
            loss, differentiated directly (with ``kl_reward="analytic"``: the unbiased ``analytic-future``).
        kl_loss: a GRPO-style KL loss term instead (``"k1-loss"``, ``"k2-loss"``, ``"k3-loss"``), or None.
        kl_chunk_size: positions per chunk of the exact KL (memory-bounded), or None for all at once.
        ref_logits: ``"store"`` (keep pi_ref's logits from the rollout), ``"recompute"`` (per
            minibatch) or ``"hidden"`` (keep pi_ref's hidden states, use ``kl_estimators.fused_kl``).
        sampler: how the rollout draws tokens: ``"inverse-cdf"`` (one uniform per row) or
            ``"multinomial"`` (``torch.multinomial``: HF ``generate``'s tokens for the same seed,
            and those of runs made before the inverse CDF); ``agents.rollout.categorical``.
        mask_top_k: NLPO: sample only the top-k tokens of a frozen masking policy, or None.
        mask_top_p: NLPO: sample only the top-p nucleus of the masking policy, or None.
        mask_sync_every: re-sync the masking policy with the policy every this many iterations.
        stats_window_size: episodes in the rollout statistics' window (SB3).
        tensorboard_log: a folder for TensorBoard logs, or None.
        policy_kwargs: keyword arguments of ``CausalLMPolicy`` (e.g. ``{"model": "smollm2-135m"}``).
        verbose: 0 silent, 1 a table of statistics after every iteration (SB3).
        seed: the random seed, or None.
        device: where the policy and the update run.

    Raises:
        ValueError: an unknown or incompatible KL, masking or reference-logits option.
    """

    policy_aliases = {"CausalLMPolicy": CausalLMPolicy}
    rollout_buffer: SequenceRolloutBuffer
    policy: CausalLMPolicy

    def __init__(
        self,
        policy: str | type[CausalLMPolicy],
        env: GymEnv | VectorEnv | None,
        learning_rate: float | Schedule = 1e-6,
        n_steps: int | None = None,
        batch_size: int = 64,
        n_epochs: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = False,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        target_kl: float | None = None,
        kl_coef: float = 0.1,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        kl_reward: str = "k1",
        analytic_grad: bool = False,
        kl_loss: str | None = None,
        kl_chunk_size: int | None = 64,
        ref_logits: str = "store",
        sampler: str = "inverse-cdf",
        mask_top_k: int | None = None,
        mask_top_p: float | None = None,
        mask_sync_every: int = 5,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        _init_setup_model: bool = True,
    ):
        self.settings = {k: v for k, v in locals().items() if k not in UNSTORED_ARGUMENTS}
        check_options(
            kl_reward=kl_reward, kl_loss=kl_loss, analytic_grad=analytic_grad, ref_logits=ref_logits, sampler=sampler, kl_coef=kl_coef,
            kl_target=kl_target, kl_horizon=kl_horizon, mask_top_k=mask_top_k, mask_top_p=mask_top_p, mask_sync_every=mask_sync_every,
        )
        if kl_reward == "analytic" and not analytic_grad and kl_coef > 0:
            warnings.warn(
                "kl_reward='analytic' without analytic_grad is a biased KL gradient: KL_t(s_t) does not "
                "depend on a_t, so the direct term E[grad KL_t] is missing and the KL is barely "
                "penalised; add analytic_grad=True (the unbiased 'analytic-future' estimator)",
                UserWarning,
                stacklevel=2,
            )
        if env is not None and n_steps is None:
            n_steps = self._wrap_env(env).max_new_tokens
        self.kl_coef = kl_coef
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.kl_reward = kl_reward
        self.analytic_grad = analytic_grad
        self.kl_loss = kl_loss
        self.kl_chunk_size = kl_chunk_size
        self.ref_logits = ref_logits
        self.sampler = sampler
        self.mask_top_k = mask_top_k
        self.mask_top_p = mask_top_p
        self.mask_sync_every = mask_sync_every
        self.masking_lm: torch.nn.Module | None = None  # NLPO's masking policy, from the first rollout
        with warnings.catch_warnings():  # SB3 warns about flat-buffer divisibility; we batch sequences
            warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
            super().__init__(
                policy,
                env,  # type: ignore[arg-type]
                learning_rate=learning_rate,
                n_steps=n_steps or 1,
                batch_size=batch_size,
                n_epochs=n_epochs,
                gamma=gamma,
                gae_lambda=gae_lambda,
                clip_range=clip_range,
                clip_range_vf=clip_range_vf,
                normalize_advantage=normalize_advantage,
                ent_coef=ent_coef,
                vf_coef=vf_coef,
                max_grad_norm=max_grad_norm,
                rollout_buffer_class=SequenceRolloutBuffer,
                rollout_buffer_kwargs={"store_ref_logits": ref_logits == "store"},
                target_kl=target_kl,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                policy_kwargs=policy_kwargs,
                verbose=verbose,
                seed=seed,
                device=device,
                _init_setup_model=False,
            )
        if self.nlpo and self.env is not None and env_masks_enabled(self.env):
            raise ValueError("the env has its own action masks: do not also set mask_top_k/mask_top_p (NLPO's masking policy)")
        if ref_logits == "hidden" and (self.nlpo or (self.env is not None and env_masks_enabled(self.env))):
            raise ValueError("ref_logits='hidden' does not support action masks (the fused KL has no mask over the vocabulary): use 'store' or 'recompute'")
        if _init_setup_model:
            self._setup_model()

    @property
    def nlpo(self) -> bool:
        """Whether actions are masked by NLPO's masking policy (``mask_top_k`` or ``mask_top_p``)."""
        return self.mask_top_k is not None or self.mask_top_p is not None

    def restore_masking_policy(self, state: dict[str, torch.Tensor]) -> None:
        """Set NLPO's masking policy to a copy of the policy's LM with the weights ``state``."""
        self.masking_lm = frozen_copy(self.policy.lm)
        self.masking_lm.load_state_dict(state, strict=True)

    def rollout_masks(self, env: VecEnv) -> NucleusMasks | EnvMasks | None:
        """This rollout's mask source; NLPO's masking policy is created at the first rollout and
        re-synced with the policy at the start of every ``mask_sync_every``-th iteration."""
        if self.nlpo:
            if self.masking_lm is None:
                self.masking_lm = frozen_copy(self.policy.lm)
            elif self.n_iterations % self.mask_sync_every == 0:
                sync_masking_policy(self.masking_lm, self.policy.lm)
            return NucleusMasks(self.masking_lm, self.mask_top_k, self.mask_top_p)
        return EnvMasks(env) if env_masks_enabled(env) else None

    @staticmethod
    def _wrap_env(env: Any, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        if isinstance(env, LMGymVecEnv):
            return env
        if isinstance(env, VectorEnv):
            return LMGymVecEnv(env)
        raise TypeError(
            "PPOKL needs lmgym's batched env: gym.make_vec('IMDBContinuation-v0', num_envs=N, "
            "vectorization_mode='vector_entry_point', autoreset_mode=AutoresetMode.SAME_STEP) "
            f"(or it wrapped in agents.vec_env.LMGymVecEnv), got {type(env).__name__}"
        )

    def _setup_model(self) -> None:
        """SB3's set-up, plus pi_ref (the env's reference model, unless ``use_reference`` replaces it),
        the KL controller and the iteration count (``load`` restores both)."""
        super()._setup_model()
        self.reference = Reference(self.env.reference_model) if self.env is not None else None
        self.kl_controller = self.make_kl_controller(self.kl_coef)
        self.n_iterations = 0
        self.rollout_stats: dict[str, float] = {}
        # the weights the run started from, which a checkpoint records (agents.state.fingerprint)
        reference = self.env.reference_model if self.env is not None else None
        self.model_fingerprints = {
            "policy": weights_fingerprint(self.policy.lm),
            "reference": weights_fingerprint(reference) if reference is not None else None,
        }

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        """SB3's set-up of ``learn``, with a logger of this model's own when none was set: SB3's
        default would create an ``SB3-<timestamp>`` folder in the system temp directory."""
        if not self._custom_logger and self.tensorboard_log is None:
            self.set_logger(Logger(folder=None, output_formats=[HumanOutputFormat(sys.stdout)] if self.verbose >= 1 else []))
        return super()._setup_learn(*args, **kwargs)

    def use_reference(self, model: torch.nn.Module) -> None:
        """Take the KL to ``model`` from now on (e.g. the LoRA policy's own base, ``agents.lora``)."""
        self.reference = Reference(model)

    def setup_learn(self, total_timesteps: int, callback: Any = None, reset_num_timesteps: bool = True) -> tuple[int, BaseCallback]:
        """SB3's set-up before the first rollout of ``learn`` (logger, counters, the first
        observation), for callers that drive ``collect_rollouts`` and ``train`` themselves."""
        return self._setup_learn(total_timesteps, callback, reset_num_timesteps)

    def make_kl_controller(self, beta: float) -> kl_estimators.FixedKLController | kl_estimators.AdaptiveKLController:
        """A fixed controller at ``beta``, or the adaptive one starting from ``beta`` if ``kl_target`` is set."""
        if self.kl_target is None:
            return kl_estimators.FixedKLController(beta)
        return kl_estimators.AdaptiveKLController(beta, self.kl_target, self.kl_horizon)

    def rollout_seed(self) -> int | None:
        """The env seed of the next rollout, a function of (seed, n_iterations) only, so that a run
        resumed from a checkpoint draws the same prompts as the uninterrupted run."""
        if self.seed is None:
            return None
        return int(np.random.SeedSequence([self.seed, self.n_iterations]).generate_state(1)[0])

    def save(self, path: str | Path, exclude: Any = None, include: Any = None) -> None:
        """Write the training state to ``path`` as safetensors + JSON (``agents.state.checkpoint``);
        ``exclude``/``include`` (SB3's pickle selection) do not apply and must be None.

        Args:
            path: the file to write (``.safetensors``; a JSON header holds the metadata).
            exclude: must be None.
            include: must be None.

        Raises:
            ValueError: ``exclude`` or ``include`` is given.
        """
        if exclude is not None or include is not None:
            raise ValueError("PPOKL.save stores the whole training state: exclude/include are not supported")
        save_ppokl(self, path)

    @classmethod
    def load(  # type: ignore[override]
        cls, path: str | Path, env: GymEnv | VectorEnv | None = None, device: torch.device | str = "cpu", **kwargs: Any
    ) -> PPOKL:
        """A model in the exact training state saved by ``save`` (never unpickles; an SB3 zip is
        refused). ``env`` is required; ``kwargs`` override saved settings.

        Args:
            path: a file written by ``save``.
            env: the vector env to continue with (required).
            device: where to load the model.
            **kwargs: settings that override the saved ones.

        Returns:
            The model, ready to continue ``learn`` exactly where it stopped.

        Raises:
            ValueError: ``env`` is None or the file is not a PPOKL checkpoint matching it.
        """
        if env is None:
            raise ValueError(
                "PPOKL.load needs env= (the policy's spaces come from it); for inference without an env "
                "load the exported Hugging Face folder with AutoModelForCausalLM.from_pretrained"
            )
        return load_ppokl(cls, path, env, device, **kwargs)

    def dump_logs(self, iteration: int = 0) -> None:
        """SB3's log dump; under torchrun ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` are means
        over every rank's episode window (all windows are equally long), not rank 0's alone."""
        if distributed.world_size() == 1 or not self.ep_info_buffer:
            super().dump_logs(iteration)
            return
        local = self.ep_info_buffer
        means = distributed.global_rollout_stats(
            {"r": float(np.mean([e["r"] for e in local])), "l": float(np.mean([e["l"] for e in local]))}
        )
        self.ep_info_buffer = deque([means], maxlen=local.maxlen)
        try:
            super().dump_logs(iteration)
        finally:
            self.ep_info_buffer = local

    def _update_learning_rate(self, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        """SB3's schedule for the LM; the value head keeps its constant ``vf_learning_rate``."""
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record(LEARNING_RATE, lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                if not group.get("fixed_lr", False):
                    group["lr"] = lr

    # ---------------------------------------------------------------- rollouts

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: SequenceRolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Sample one episode per env with the policy's KV cache; store what ``train`` needs.

        A rollout counts ``n_envs x n_steps`` timesteps even when every episode ends early, so
        ``learn(total_timesteps)`` runs a whole number of iterations, the same on every rank.
        """
        self.policy.set_training_mode(False)
        env.seed(self.rollout_seed())
        self._last_obs = env.reset()
        prompt_ids, prompt_mask = trim_left_padding(self._last_obs["input_ids"], self._last_obs["attention_mask"])
        rollout_buffer.reset(prompt_ids, prompt_mask)
        callback.on_rollout_start()
        start = time.perf_counter()
        masks = self.rollout_masks(env)
        fused = self.ref_logits == "hidden"
        for step in sample_episodes(self.policy, env, self.reference, prompt_ids, prompt_mask, n_rollout_steps, masks, fused, self.kl_chunk_size, self.sampler):
            self.num_timesteps += env.num_envs
            new_obs, dones = step.new_obs, step.dones
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(step.infos, dones)
            rollout_buffer.add(step)
        self.num_timesteps += env.num_envs * (n_rollout_steps - rollout_buffer.n_steps)
        self._last_obs = new_obs
        self._last_episode_starts = dones
        rollout_seconds = time.perf_counter() - start

        beta = self.kl_controller.value
        rollout_buffer.compute_returns_and_advantage(self.kl_reward, beta, self.analytic_grad)
        if self.ref_logits == "hidden" and rollout_buffer.ref_hidden is None:  # pi_ref came per step from the env
            self._store_reference_hidden(rollout_buffer)
        self._record_rollout_stats(rollout_buffer, beta, rollout_seconds)
        self.kl_controller.update(self.rollout_stats[KL_ANALYTIC], env.num_envs * distributed.world_size())
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _store_reference_hidden(self, buffer: SequenceRolloutBuffer) -> None:
        """pi_ref's final hidden states at every sampled state, from one forward over the rollout."""
        batch = buffer.sequences(torch.arange(buffer.n_envs))
        buffer.ref_hidden = self.reference.hidden(batch.input_ids, batch.attention_mask, batch.actions.shape[1]).cpu()

    def _record_rollout_stats(self, buffer: SequenceRolloutBuffer, beta: float, seconds: float) -> None:
        n_tokens = int(buffer.mask.sum())
        self.rollout_stats = {
            TASK_REWARD: float(buffer.task_rewards.mean()),
            KL_ANALYTIC: float(buffer.analytic_kl.sum(dim=1).mean()),
            KL_IN_REWARD: float(buffer.kl.sum(dim=1).mean()),
            KL_COEF: beta,
            GEN_LENGTH: n_tokens / buffer.n_envs,
            ROLLOUT_TOKENS_PER_S: n_tokens / max(seconds, 1e-9),
        }
        if buffer.action_masks is not None:
            allowed = buffer.action_masks.sum(-1).float()
            self.rollout_stats[MASK_TOKENS] = float((allowed * buffer.mask).sum() / max(n_tokens, 1))
        self.rollout_stats = distributed.global_rollout_stats(self.rollout_stats, summed=[ROLLOUT_TOKENS_PER_S])
        for key, value in self.rollout_stats.items():
            self.logger.record(key, value)

    # ---------------------------------------------------------------- update

    def kl_loss_term(
        self, batch: SequenceBatch, logits: torch.Tensor | None, logprobs: torch.Tensor, kl: torch.Tensor | None = None
    ) -> torch.Tensor:
        """beta x the per-token mean of the KL term whose gradient is added to PPO's (0 if none).

        ``kl_estimators.sequence_kl_loss`` is a batch mean of per-sequence sums; scaling by
        B / n_tokens turns it into a per-token mean, the same weighting as the PPO terms.

        The rollout policy mu (``batch.old_logprobs``) sampled the batch; after the first
        minibatch step pi != mu. ``analytic_grad`` puts only the direct term sum_t KL_t(s_t) in the
        loss, as ``analytic-is``: sg(W_{t-1}) KL_t with the prefix ratio W_{t-1} = prod_{t'<t} pi/mu,
        so its expected gradient is E_pi[sum_t grad KL_t(s_t)] at every epoch (exactly the
        on-policy direct term; without the weight it would be taken at mu's states; W is not
        clipped, so its variance grows with how far pi has moved from mu). The future
        term (score_t x later KLs) is not in this loss: with ``kl_reward`` it is in the reward, and
        PPO's clipped token-ratio surrogate handles it like the task reward (no prefix ratio). At
        the first epoch (W = 1) the total is ``analytic-future`` (``kl_reward="analytic"``).
        ``kl_loss`` estimators ignore mu, as the frameworks they model do. ``kl``: KL_t [b, T]
        already computed by the fused pass (``ref_logits="hidden"``), in place of the logits.
        """
        estimator = "analytic-is" if self.analytic_grad else self.kl_loss
        if estimator is None:
            return torch.zeros((), device=logprobs.device)
        scale = batch.mask.shape[0] / batch.mask.sum().clamp(min=1)
        loss = kl_estimators.sequence_kl_loss(
            estimator,
            logprobs,
            batch.ref_logprobs,
            batch.mask,
            logits=logits if kl is None else None,
            ref_logits=batch.ref_logits if kl is None else None,
            behaviour_logprobs=batch.old_logprobs,
            chunk_size=self.kl_chunk_size,
            kl=kl,
        )
        return self.kl_controller.value * scale * loss

    def ppo_losses(self, batch: SequenceBatch, clip_range: float, clip_range_vf: float | None) -> dict[str, torch.Tensor]:
        """All loss terms for one minibatch of sequences (means over generated tokens, as SB3)."""
        mask = batch.mask.float()
        if self.ref_logits == "hidden":
            logits, logprobs, entropy, kl, values = None, *self.fused_forward(batch)
        else:
            logits, values = self.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
            logits = masked_logits(logits, batch.action_masks)  # pi^M: the policy that sampled the batch
            log_softmax = torch.log_softmax(logits, dim=-1)
            logprobs = log_softmax.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
            # a [B, T, V] backward for a term of weight 0 would be wasted
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.ent_coef != 0):
                entropy = masked_entropy(log_softmax)
            kl = None

        advantages = batch.advantages
        if self.normalize_advantage and mask.sum() > 1:
            mean = masked_mean(advantages, mask)
            std = masked_mean((advantages - mean) ** 2, mask).sqrt()
            advantages = (advantages - mean) / (std + 1e-8)
        log_ratio = logprobs - batch.old_logprobs
        ratio = torch.exp(log_ratio)
        policy_loss = -masked_mean(
            torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)), mask
        )
        if clip_range_vf is not None:
            values = batch.old_values + torch.clamp(values - batch.old_values, -clip_range_vf, clip_range_vf)
        value_loss = masked_mean((batch.returns - values) ** 2, mask)
        entropy_loss = -masked_mean(entropy, mask)
        kl_loss = self.kl_loss_term(batch, logits, logprobs, kl)
        loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss + kl_loss
        with torch.no_grad():
            approx_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)
            clip_fraction = masked_mean((torch.abs(ratio - 1) > clip_range).float(), mask)
        return {
            "loss": loss,
            "policy_gradient_loss": policy_loss,
            "value_loss": value_loss,
            "entropy_loss": entropy_loss,
            "kl_loss": kl_loss,
            "approx_kl": approx_kl,
            "clip_fraction": clip_fraction,
        }

    def fused_forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """log pi(y_t), H(pi(.|s_t)), KL_t (None without ``analytic_grad``) and V(s_t), [b, T] each,
        from the policy's and pi_ref's hidden states through ``kl_estimators.fused_kl`` (0 where
        ``batch.mask`` is False): the ``ref_logits="hidden"`` update, with no [b, T, V] tensor."""
        hidden, values = self.policy.sequence_hidden(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
        policy = linear_logits(self.policy.lm, hidden)
        reference = self.reference.output_layer(batch.ref_hidden) if self.analytic_grad else None
        out = kl_estimators.fused_kl(policy, reference, batch.actions, batch.mask, self.kl_chunk_size)
        entropy = out.entropy if self.ent_coef != 0 else out.entropy.detach()  # no backward for a weight-0 term
        return out.logprobs, entropy, out.kl if self.analytic_grad else None, values

    def train(self) -> None:
        """PPO epochs over minibatches of whole sequences."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = (
            None if self.clip_range_vf is None else self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        )
        buffer = self.rollout_buffer
        sequences_per_batch = max(1, round(self.batch_size / max(buffer.n_steps, 1)))
        generator = torch.Generator().manual_seed(1_000_003 * (self.seed or 0) + self.n_iterations)
        history: dict[str, list[float]] = {}
        start = time.perf_counter()
        continue_training = True
        for epoch in range(self.n_epochs):
            for batch in buffer.get(sequences_per_batch, generator):
                if self.ref_logits == "recompute" and self.analytic_grad:
                    batch = self.reference.with_logits(batch)
                losses = self.ppo_losses(batch, clip_range, clip_range_vf)
                weight, union = distributed.union_minibatch(losses, batch.mask.sum())
                if not np.isfinite(union["loss"]):
                    raise FloatingPointError(
                        f"non-finite PPO loss at epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in union.items())
                    )
                for key, value in union.items():
                    history.setdefault(key, []).append(value)
                if self.target_kl is not None and union["approx_kl"] > 1.5 * self.target_kl:
                    continue_training = False
                    break
                self.policy.optimizer.zero_grad()
                (losses["loss"] * weight).backward()
                distributed.average_gradients(self.policy.parameters())
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break
        check_finite(self, f"after the update of iteration {self.n_iterations + 1}")
        self.n_iterations += 1
        mask = buffer.mask
        self.logger.record(EXPLAINED_VARIANCE, distributed.explained_variance(buffer.values[mask], buffer.returns[mask]))
        for key, values in history.items():
            self.logger.record(f"{TRAIN_PREFIX}{key}", float(np.mean(values)))
        self.logger.record(N_UPDATES, self._n_updates, exclude="tensorboard")
        self.logger.record(CLIP_RANGE, clip_range)
        self.logger.record(TRAIN_SECONDS, time.perf_counter() - start)
