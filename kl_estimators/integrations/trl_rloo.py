"""TRL's ``RLOOTrainer`` with any estimator of ``kl_estimators`` as its KL term (tested with trl 1.16.0).

    from kl_estimators.integrations.trl_rloo import KLRLOOTrainer
    trainer = KLRLOOTrainer(model=..., reward_funcs=..., args=RLOOConfig(beta=0.05, ...),
                            kl_estimator="analytic-future")

TRL's RLOO puts k1 in the reward: R = r - beta x sum_t (log pi_old - log pi_ref)(y_t), at the
rollout policy, before the leave-one-out baseline; its loss is PPO's clipped sequence ratio times
that advantage, averaged over the sequences. Each estimator goes where it needs to be:

- ``"reinforce"``: k1 in the sequence reward, exactly TRL's ``RLOOTrainer`` (loss, gradients,
  advantages). Its gradient is grad KL on-policy; with ``num_iterations > 1`` the penalty is that
  of the rollout policy (biased, as TRL's).
- ``"analytic-future"`` (the default): the exact KL in the reward. Its reward part,
  sum_t KL(pi_old(.|s_t) || pi_ref(.|s_t)), replaces k1 in TRL's sequence reward (same baseline and
  clipping), and its direct part, sum_t KL_t of the current forward, is added to the loss (sequence
  sum, batch mean: the reward's scale). The reward alone has no fixed point at pi* (the tabular
  study); the two together have expected gradient beta x grad KL(pi || pi_ref) on-policy
  (``score_t`` x a sum over the whole sequence equals the future sum in expectation). KL_t comes
  from ``kl_estimators.fused_kl`` on the hidden states of the forwards TRL already runs (the old
  policy's and the reference's at generation, the policy's in the loss): no [B, T, V] logits.
  Needs each batch used for one optimiser step (``num_iterations = 1``, ``steps_per_generation =
  gradient_accumulation_steps``: else the reward is a stale policy's), no advantage normalisation
  (it would rescale the reward part only). With PEFT the reference's hidden states come from TRL's
  adapter-disabled forward and its output layer is the base model's; an adapter on the output layer
  itself is refused by the log-prob check.
- Any other estimator goes in the loss only: beta x the sequence sum of
  ``per_token_kl_loss(kl_estimator, ...)``, batch mean, with the rollout (old) policy's per-token
  log-probs as the behaviour policy mu. With ``num_iterations > 1`` the ``-is`` estimators
  (``"analytic-future-is"``, ``"reinforce-future-is"``) are the unbiased ones.

TRL's ``kl`` metric stays the per-token mean of the reward's KL (k1 for ``"reinforce"``, KL_t for
``"analytic-future"``); for loss-placed estimators it is the per-token mean of k1 at the rollout
policy, as TRL's. The estimator's loss term is logged as ``kl_estimator_loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import RLOOTrainer

from kl_estimators.fused import fused_kl
from kl_estimators.gradients import per_token_kl_loss
from kl_estimators.info import ESTIMATOR_INFO
from kl_estimators.integrations.trl import KLGRPOTrainer, _backbone
from kl_estimators.integrations.trl_checks import check_kl_arguments, check_sampler, check_zero3, product_dtype_of

REWARD_ESTIMATORS = ("reinforce", "analytic-future")  # those whose score part goes in RLOO's sequence reward


class KLRLOOTrainer(RLOOTrainer):
    """``RLOOTrainer`` whose KL term is the estimator ``kl_estimator``, placed as the module docstring says.

    ``weight_clip`` and ``chunk_size`` are passed to ``per_token_kl_loss`` / ``fused_kl``, and
    ``product_dtype`` to the analytic estimators' ``LinearLogits`` (as ``KLGRPOTrainer``'s).
    """

    # lm_head(h) / T as LinearLogits, the logit scale read from the config and each model's own logits
    # checked once against it, and which forward is the reference's: as in KLGRPOTrainer
    _linear_logits = KLGRPOTrainer._linear_logits
    _check_logit_transform = KLGRPOTrainer._check_logit_transform
    _check_output_layer = KLGRPOTrainer._check_output_layer
    _is_reference = KLGRPOTrainer._is_reference

    def __init__(self, *args: Any, kl_estimator: str = "analytic-future", weight_clip: Any = None,
                 chunk_size: int | None = None, product_dtype: Any = None, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)  # RLOOTrainer(model, reward_funcs, args, ...)
        check_kl_arguments(kl_estimator, getattr(config, "beta", 0.05), weight_clip, chunk_size, product_dtype)
        if config is not None:
            check_zero3(kl_estimator, getattr(config, "deepspeed", None))
            check_sampler({"top_k": config.top_k, "top_p": config.top_p, "min_p": config.min_p, **(config.generation_kwargs or {})})
            if kl_estimator == "analytic-future" and (
                    config.num_iterations > 1 or config.steps_per_generation > config.gradient_accumulation_steps):
                raise ValueError("kl_estimator='analytic-future' puts the rollout policy's KL in the reward, which is stale "
                                 "with num_iterations > 1 or steps_per_generation > gradient_accumulation_steps: "
                                 "use 'analytic-future-is'")
            if kl_estimator == "analytic-future" and config.normalize_advantages:
                raise ValueError("kl_estimator='analytic-future' needs normalize_advantages=False: the normalisation "
                                 "would rescale its reward part but not its direct part")
        super().__init__(*args, **kwargs)  # without args, TRL's RLOOConfig: beta 0.05, num_iterations 1
        self.kl_estimator = kl_estimator
        self.kl_weight_clip = weight_clip
        self.kl_chunk_size = chunk_size
        self.kl_product_dtype = product_dtype_of(product_dtype)
        self._captured: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._generating = False
        self._checked_output_layers: set[tuple[int, bool]] = set()
        if ESTIMATOR_INFO[kl_estimator].needs_logits:
            self._logit_scale = self._check_logit_transform()

    # -- TRL's forwards, observed ------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._captured is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        hidden: list[torch.Tensor] = []
        handle = None
        if ESTIMATOR_INFO[self.kl_estimator].needs_logits:
            self._check_output_layer(model, input_ids, attention_mask, self._is_reference(model))
            handle = _backbone(self.accelerator.unwrap_model(model)).register_forward_hook(
                lambda _module, _inputs, output: hidden.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
            )
        try:
            logps, *rest = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self._captured.append((logps, torch.cat(hidden) if hidden else None))
        if self._generating and len(self._captured) == 2:
            logps = self._reference_for_reward(model, attention_mask[:, -logits_to_keep:].bool())
        return (logps, *rest)

    def _reference_for_reward(self, ref_model, mask: torch.Tensor) -> torch.Tensor:
        """What TRL's reward line receives as ``ref_per_token_logps``: TRL subtracts
        beta x sum_t (old - this), so this is old - (the estimator's per-token reward part)."""
        (old, old_hidden), (ref, ref_hidden) = self._captured
        if self.kl_estimator == "reinforce":
            return ref  # TRL's own k1
        if self.kl_estimator == "analytic-future":
            policy = self._linear_logits(self.model, old_hidden)
            reference = self._linear_logits(ref_model, ref_hidden, detach=True)
            return old - fused_kl(policy, reference, mask=mask, chunk_size=self.kl_chunk_size).kl.to(old.dtype)
        return old  # loss-placed: no reward part

    def _generate_and_score_completions(self, inputs):
        self._captured, self._generating = [], True
        try:
            output = super()._generate_and_score_completions(inputs)
            (old, _), (ref, ref_hidden) = self._captured
        finally:
            self._captured, self._generating = None, False
        if self.kl_estimator == "reinforce":  # TRL's RLOO as it is
            return output
        output["ref_per_token_logps"] = ref
        output["old_per_token_logps"] = old
        if ref_hidden is not None:
            output["ref_hidden_states"] = ref_hidden.detach()
        if self.kl_estimator not in REWARD_ESTIMATORS:
            self._undo_reward_kl(output)
        return output

    def _undo_reward_kl(self, output: dict) -> None:
        """Loss-placed estimators: TRL's reward line subtracted beta x sum_t (old - ref') with
        ref' = old on the mask, i.e. nothing; its ``kl`` metric read 0, so it is set to TRL's k1 mean."""
        mask = output["completion_mask"]
        k1 = (output["old_per_token_logps"] - output["ref_per_token_logps"]) * mask
        stats = self.accelerator.reduce(torch.stack([k1.sum(), mask.sum().float()]), reduction="sum")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl"][-1] = (stats[0] / stats[1].clamp(min=1.0)).item()

    # -- the loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if self.kl_estimator == "reinforce":
            return super()._compute_loss(model, inputs)
        self._captured, self._generating = [], False
        try:
            loss = super()._compute_loss(model, inputs)
            ((logps, hidden),) = self._captured
        finally:
            self._captured = None
        mask = inputs["completion_mask"].bool()
        ref = inputs["ref_per_token_logps"]
        logits = ref_logits = None
        if hidden is not None:
            logits = self._linear_logits(model, hidden)
            # PEFT: the reference is this model with its adapter disabled, whose output layer's weight is the base's
            ref_model = self.ref_model if self.ref_model is not None else model
            ref_logits = self._linear_logits(ref_model, inputs["ref_hidden_states"], detach=True)
        estimator = "analytic" if self.kl_estimator == "analytic-future" else self.kl_estimator  # the loss part
        terms = per_token_kl_loss(estimator, logps, ref, mask, logits, ref_logits,
                                  behaviour_logprobs=inputs["old_per_token_logps"],
                                  weight_clip=self.kl_weight_clip, chunk_size=self.kl_chunk_size)
        kl_loss = (terms * mask).sum(-1).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_estimator_loss"].append(self.accelerator.gather(kl_loss.detach()).mean().item())
        return loss + self.beta * kl_loss.to(loss.dtype)
