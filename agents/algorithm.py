"""PPOKL: stable-baselines3 PPO for token-level text generation with exact KL handling.

Only what text generation changes is overridden: ``collect_rollouts`` (batched sampling with the
policy's KV cache, one episode per env, reference logits from the env) and ``train`` (a PPO
update over whole sequences with the KL terms of ``kl_estimators``). ``learn``, ``save``,
``load``, ``predict``, callbacks and the logger are SB3's own.

KL handling (beta = ``kl_coef``):
- ``kl_reward``: per-token reward r_t = -beta KL_t with KL_t one of k1/k2/k3 (sampled log-ratio
  estimates) or ``analytic`` (exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the vocabulary), or none.
- ``analytic_grad``: the current token's KL is taken out of its advantage and the exact
  per-position KL is added to the loss, beta * mean_t KL_t(theta), and differentiated directly.
  With ``kl_reward="analytic"`` this is the unbiased ``analytic-future`` estimator of
  ``kl_estimators`` (exactly so for gamma = lambda = 1).
- ``kl_loss``: GRPO-style autodiff of a sampled estimate (k1/k2/k3-loss), for study; their biases
  are documented in ``kl_estimators.gradients``.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecEnv

import kl_estimators
from agents.advantages import KL_REWARDS
from agents.buffer import SequenceBatch, SequenceRolloutBuffer
from agents.policy import CausalLMPolicy
from agents.sampling import sample_episodes, trim_left_padding
from agents.vec_env import LMGymVecEnv

KL_LOSSES = ("k1-loss", "k2-loss", "k3-loss")


def check_kl_options(kl_reward: str, kl_loss: str | None, analytic_grad: bool, kl_coef: float) -> None:
    """ValueError for an unknown or incompatible KL configuration (shared by PPOKL and the CLI)."""
    if kl_reward not in KL_REWARDS:
        raise ValueError(f"kl_reward must be one of {KL_REWARDS}, got {kl_reward!r}")
    if kl_loss is not None and kl_loss not in KL_LOSSES:
        raise ValueError(f"kl_loss must be one of {KL_LOSSES} or None, got {kl_loss!r}")
    if analytic_grad and kl_loss is not None:
        raise ValueError("analytic_grad and kl_loss both add a KL gradient term: choose one")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class PPOKL(PPO):
    """PPO with a KL penalty to a frozen reference model, for ``lmgym`` text environments.

    ``batch_size`` counts tokens (transitions) as in SB3 and is rounded to whole sequences;
    ``n_steps`` is the env's ``max_new_tokens`` (a rollout is one episode per env).
    ``target_kl`` keeps SB3's meaning (early stopping on approx KL); the adaptive KL controller's
    target is ``kl_target``.
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
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        _init_setup_model: bool = True,
    ):
        check_kl_options(kl_reward, kl_loss, analytic_grad, kl_coef)
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
                target_kl=target_kl,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                policy_kwargs=policy_kwargs,
                verbose=verbose,
                seed=seed,
                device=device,
                _init_setup_model=False,
            )
        if _init_setup_model:
            self._setup_model()

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
        """SB3's set-up; the KL controller and iteration count survive ``load`` (SB3 restores the
        saved attributes before calling this)."""
        super()._setup_model()
        if not hasattr(self, "kl_controller"):
            self.kl_controller = (
                kl_estimators.FixedKLController(self.kl_coef)
                if self.kl_target is None
                else kl_estimators.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
            )
        self.n_iterations: int = getattr(self, "n_iterations", 0)
        self.rollout_stats: dict[str, float] = getattr(self, "rollout_stats", {})
        self._needs_reset = False  # True after a rollout that left some env mid-episode

    def _update_learning_rate(self, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        """SB3's schedule for the LM; the value head keeps its constant ``vf_learning_rate``."""
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                if not group.get("fixed_lr", False):
                    group["lr"] = lr

    # ---------------------------------------------------------------- rollouts

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: SequenceRolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Sample one episode per env with the policy's KV cache; store what ``train`` needs."""
        self.policy.set_training_mode(False)
        if self._needs_reset or env.current_ref_logits is None:
            self._last_obs = env.reset()
        prompt_ids, prompt_mask = trim_left_padding(self._last_obs["input_ids"], self._last_obs["attention_mask"])
        rollout_buffer.reset(prompt_ids, prompt_mask)
        callback.on_rollout_start()
        start = time.perf_counter()
        for step in sample_episodes(self.policy, env, prompt_ids, prompt_mask, n_rollout_steps):
            self.num_timesteps += env.num_envs
            new_obs, dones = step.new_obs, step.dones
            callback.update_locals(locals())
            if not callback.on_step():
                self._needs_reset = True
                return False
            self._update_info_buffer(step.infos, dones)
            rollout_buffer.add(step)
        self._last_obs = new_obs
        self._last_episode_starts = dones
        self._needs_reset = not bool(np.all(dones))
        rollout_seconds = time.perf_counter() - start

        beta = self.kl_controller.value
        rollout_buffer.compute_returns_and_advantage(self.kl_reward, beta, self.analytic_grad)
        self._record_rollout_stats(rollout_buffer, beta, rollout_seconds)
        self.kl_controller.update(self.rollout_stats["rollout/kl_analytic"], env.num_envs)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _record_rollout_stats(self, buffer: SequenceRolloutBuffer, beta: float, seconds: float) -> None:
        n_tokens = int(buffer.mask.sum())
        self.rollout_stats = {
            "rollout/task_reward": float(buffer.task_rewards.mean()),
            "rollout/kl_analytic": float(buffer.analytic_kl.sum(dim=1).mean()),
            "rollout/kl_in_reward": float(buffer.kl.sum(dim=1).mean()),
            "rollout/kl_coef": beta,
            "rollout/gen_length": n_tokens / buffer.n_envs,
            "time/rollout_tokens_per_s": n_tokens / max(seconds, 1e-9),
        }
        for key, value in self.rollout_stats.items():
            self.logger.record(key, value)

    # ---------------------------------------------------------------- update

    def kl_loss_term(self, batch: SequenceBatch, logits: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
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
        ``kl_loss`` estimators ignore mu, as the frameworks they model do.
        """
        estimator = "analytic-is" if self.analytic_grad else self.kl_loss
        if estimator is None:
            return torch.zeros((), device=logits.device)
        scale = batch.mask.shape[0] / batch.mask.sum().clamp(min=1)
        loss = kl_estimators.sequence_kl_loss(
            estimator,
            logprobs,
            batch.ref_logprobs,
            batch.mask,
            logits=logits,
            ref_logits=batch.ref_logits,
            behaviour_logprobs=batch.old_logprobs,
            chunk_size=self.kl_chunk_size,
        )
        return self.kl_controller.value * scale * loss

    def ppo_losses(self, batch: SequenceBatch, clip_range: float, clip_range_vf: float | None) -> dict[str, torch.Tensor]:
        """All loss terms for one minibatch of sequences (means over generated tokens, as SB3)."""
        mask = batch.mask.float()
        logits, values = self.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
        log_softmax = torch.log_softmax(logits, dim=-1)
        logprobs = log_softmax.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)

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
        kl_loss = self.kl_loss_term(batch, logits, logprobs)
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
                losses = self.ppo_losses(batch, clip_range, clip_range_vf)
                if not torch.isfinite(losses["loss"]):
                    raise FloatingPointError(
                        f"non-finite PPO loss at epoch {epoch}: "
                        + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    )
                for key, value in losses.items():
                    history.setdefault(key, []).append(value.item())
                if self.target_kl is not None and float(losses["approx_kl"]) > 1.5 * self.target_kl:
                    continue_training = False
                    break
                self.policy.optimizer.zero_grad()
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break
        self.n_iterations += 1
        mask = buffer.mask
        self.logger.record(
            "train/explained_variance",
            float(explained_variance(buffer.values[mask].numpy(), buffer.returns[mask].numpy())),
        )
        for key, values in history.items():
            self.logger.record(f"train/{key}", float(np.mean(values)))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        self.logger.record("time/train_seconds", time.perf_counter() - start)
