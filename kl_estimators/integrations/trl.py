"""TRL's ``GRPOTrainer`` with any estimator of ``kl_estimators`` as its KL term (tested with trl 1.16.0).

    from kl_estimators.integrations.trl import KLGRPOTrainer
    trainer = KLGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.04, ...),
                            kl_estimator="reinforce-future-is")

The loss is TRL's own (``GRPOTrainer._compute_loss`` run with beta = 0) plus beta times this
library's per-token KL term, aggregated exactly as TRL aggregates its per-token loss for the
configured ``loss_type``. TRL's own k3 term is replaced (``use_bias_correction_kl`` is then
ignored): ``kl_estimator="k3-loss"`` reproduces TRL with ``use_bias_correction_kl=False``, and
``"k3-ratio"`` reproduces ``use_bias_correction_kl=True`` at ``importance_sampling_level="token"``
(``tests/test_frameworks_trl.py``).

Inputs of the estimator, all from TRL's own passes (no extra forward): log pi = the per-token
log-probs of ``_compute_loss``'s forward, log pi_ref = ``ref_per_token_logps``, and the behaviour
policy mu = ``old_per_token_logps`` (the policy that generated the batch, which TRL keeps when
``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps``; otherwise mu =
sg(pi), exact since then pi has not moved). With vLLM, mu is TRL's recomputed old policy, not the
vLLM sampler: the train/inference mismatch is not corrected in the KL term.

Estimators that need logits (``analytic*``): TRL 1.16 never builds the [B, T, V] logits (its
fused LM head projects in tiles). This trainer keeps the backbone's last hidden states of the
policy forward in ``_compute_loss`` and of the reference forward at generation ([B, T, H] each,
stored with the batch) and passes them with each model's output layer as ``LinearLogits`` to
``kl_estimators.fused_kl``: no [b, T, V] tensor exists, only ``chunk_size`` rows of logits at a
time (None: automatic), and the output layers are recomputed in backward (``docs/fused-kl.md``).
A model whose logits are not plain ``lm_head(h) / temperature`` (logit scaling or soft-capping)
is refused with an error: the first micro-batch of each model is checked against TRL's log-probs.

Aggregation and bias: the guarantees of ``ESTIMATOR_INFO`` hold for a token sum divided by a
constant: ``loss_type`` "dapo" (the default), "dr_grpo", "luspo", "cispo", "vespo". "grpo" and
"sapo" divide each sequence by its own length and "bnpo" by the micro-batch's token count, so an
unbiased estimator would not stay unbiased: that combination is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

from kl_estimators.fused import LinearLogits, fused_kl
from kl_estimators.gradients import per_token_kl_loss
from kl_estimators.info import ESTIMATOR_INFO

CONSTANT_NORMALISER_LOSS_TYPES = ("dapo", "dr_grpo", "luspo", "cispo", "vespo")
# |our log-softmax - TRL's fused log-probs| at the sampled tokens, above which the logits are not
# lm_head(h) / temperature: measured ~1e-6 in float32 and ~2e-2 under bf16 autocast on the test model.
_MAX_LOGPROB_MISMATCH = {"no": 1e-3, "mixed": 0.1}


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output's ``last_hidden_state`` TRL's fused LM head projects."""
    return getattr(model, "base_model", model)


class KLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose KL term is ``kl_estimators.per_token_kl_loss(kl_estimator, ...)``.

    Loss = TRL's policy loss + beta x aggregate_loss_type(per-token KL term), where the per-token
    term's gradient is the named estimator (its expectation: ``ESTIMATOR_INFO[kl_estimator]``) and
    the aggregation is the one TRL applies to its own per-token loss for ``args.loss_type``.
    ``weight_clip`` and ``chunk_size`` are passed to ``per_token_kl_loss``.
    """

    def __init__(self, *args: Any, kl_estimator: str = "analytic-future-is", weight_clip: Any = None,
                 chunk_size: int | None = None, **kwargs: Any) -> None:
        if kl_estimator not in ESTIMATOR_INFO:
            raise ValueError(f"kl_estimator must be one of {tuple(ESTIMATOR_INFO)}, got {kl_estimator!r}")
        super().__init__(*args, **kwargs)
        info = ESTIMATOR_INFO[kl_estimator]
        if self.beta == 0.0:
            raise ValueError("KLGRPOTrainer needs GRPOConfig(beta > 0): beta is the KL coefficient")
        if (info.unbiased_on_policy or info.unbiased_off_policy) and self.loss_type not in CONSTANT_NORMALISER_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} normalises each sequence or micro-batch by its own token count, which "
                f"biases kl_estimator={kl_estimator!r}: use one of {CONSTANT_NORMALISER_LOSS_TYPES}"
            )
        if info.needs_logits and self.ref_model is None:
            raise ValueError(f"kl_estimator={kl_estimator!r} needs the reference model's logits: PEFT without a separate ref_model is not supported")
        self.kl_estimator = kl_estimator
        self.kl_weight_clip = weight_clip
        self.kl_chunk_size = chunk_size
        self._captured: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] | None = None
        self._checked_output_layers: set[int] = set()

    # -- TRL's forwards, observed ------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._captured is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        hidden: list[torch.Tensor] = []
        handle = None
        if ESTIMATOR_INFO[self.kl_estimator].needs_logits:
            handle = _backbone(self.accelerator.unwrap_model(model)).register_forward_hook(
                lambda _module, _inputs, output: hidden.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
            )
        try:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self._captured.append((model, out[0], torch.cat(hidden) if hidden else None))
        return out

    def _generate_and_score_completions(self, inputs):
        if not ESTIMATOR_INFO[self.kl_estimator].needs_logits:
            return super()._generate_and_score_completions(inputs)
        self._captured = []
        try:
            output = super()._generate_and_score_completions(inputs)
            ref_hidden = [h for model, _, h in self._captured if model is self.ref_model]
        finally:
            self._captured = None
        output["ref_hidden_states"] = torch.cat(ref_hidden).detach()
        return output

    # -- the loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        beta, self.beta, self._captured = self.beta, 0.0, []
        try:
            loss = super()._compute_loss(model, inputs)
            (_, logps, hidden), = self._captured
        finally:
            self.beta, self._captured = beta, None
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logits = ref_logits = None
        if hidden is not None:
            ids = inputs["completion_ids"]
            logits = self._linear_logits(model, hidden, ids, logps, mask)
            ref_logits = self._linear_logits(self.ref_model, inputs["ref_hidden_states"], ids, inputs["ref_per_token_logps"], mask)
        terms = per_token_kl_loss(
            self.kl_estimator, logps, inputs["ref_per_token_logps"], mask.bool(), logits, ref_logits,
            behaviour_logprobs=inputs.get("old_per_token_logps"),
            weight_clip=self.kl_weight_clip, chunk_size=self.kl_chunk_size,
        )
        kl_loss = self.aggregate(terms, mask, inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_estimator_loss"].append(self.accelerator.gather(kl_loss.detach()).mean().item())
        return loss + beta * kl_loss.to(loss.dtype)

    def _linear_logits(self, model, hidden: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor) -> LinearLogits:
        """The logits lm_head(h) / temperature as ``LinearLogits`` (never materialised); the first
        time for each output layer, its log-probs of the sampled tokens are checked against TRL's."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        logits = LinearLogits(hidden, head.weight, head.bias, float(self.temperature))
        if id(head) not in self._checked_output_layers:
            with torch.no_grad():
                ours = fused_kl(logits, None, ids, mask.bool(), self.kl_chunk_size).logprobs
                mismatch = ((ours - logps.float()).abs() * mask).max()
            if mismatch > _MAX_LOGPROB_MISMATCH["no" if self.accelerator.mixed_precision == "no" else "mixed"]:
                raise ValueError(
                    f"this model's logits are not lm_head(h) / temperature (log-probs differ from TRL's by {mismatch:.2g}): "
                    f"kl_estimator={self.kl_estimator!r} is not supported for it"
                )
            self._checked_output_layers.add(id(head))
        return logits

    def aggregate(self, terms: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """TRL 1.16's aggregation of a per-token loss [B, T] for ``self.loss_type`` (``_compute_loss``)."""
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        masked = terms * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (terms.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("dapo", "cispo", "vespo"):
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normaliser
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"unknown loss_type {self.loss_type!r}")
