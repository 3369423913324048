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
The logits are s (h W^T + b) / temperature with the scale s read from the config as TRL reads it
(``trl_checks.logit_transform``: Granite's 1 / logits_scaling, ...); soft-capped models are
refused. Once per model, its own forward's logits (autocast off) are checked against s (h W^T + b)
to the rounding of their dtype: a scaling the config does not declare is refused.
With PEFT, the reference is TRL's: the same model with its adapters disabled (or its "ref"
adapter); its hidden states come from TRL's reference forward, and the output layer is shared
(an adapter on it is refused). Under FSDP2 the output layer's DTensor shards are gathered.

Metrics: ``kl`` (as TRL's: the per-token mean of the KL term's value) and ``kl_estimator_loss``.
Checkpoints carry ``kl_estimator.json``; a resume with another estimator or weight_clip is refused.
Refused before any model loads: bad arguments, truncated or reshaped sampling (top_k, top_p,
min_p, ...), and "k3-ratio" at ``importance_sampling_level="sequence"`` (``trl_checks``).

Aggregation and bias: the guarantees of ``ESTIMATOR_INFO`` hold for a token sum divided by a
constant: ``loss_type`` "dapo" (the default), "dr_grpo", "luspo", "cispo", "vespo". "grpo" and
"sapo" divide each sequence by its own length and "bnpo" by the micro-batch's token count, so an
unbiased estimator would not stay unbiased: that combination is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple

import torch
from trl import GRPOTrainer

from kl_estimators.fused import LinearLogits
from kl_estimators.gradients import per_token_kl_loss
from kl_estimators.info import ESTIMATOR_INFO
from kl_estimators.integrations.trl_checks import (
    CONSTANT_NORMALISER_LOSS_TYPES,
    check_importance_level,
    check_kl_arguments,
    check_loss_type,
    check_sampler,
    check_zero3,
    logit_transform,
    product_dtype_of,
)

__all__ = ["CONSTANT_NORMALISER_LOSS_TYPES", "ESTIMATOR_FILE", "KLGRPOTrainer", "output_layer"]

ESTIMATOR_FILE = "kl_estimator.json"  # written beside each TRL checkpoint


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output's ``last_hidden_state`` TRL's fused LM head projects (inside a PEFT
    wrapper: the wrapped causal LM's backbone)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def output_layer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, d], bias [V] or None) of ``model``'s output layer, whole: a DTensor shard (FSDP2)
    is gathered, differentiably, as TRL's fused LM head gathers it.

    Raises ValueError for an output layer carrying a PEFT adapter (its logits are not h W^T + b)."""
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise ValueError(
            "the output layer carries a PEFT adapter (lm_head in target_modules or modules_to_save): the analytic "
            "estimators need a plain output layer; remove lm_head from the adapter"
        )
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


@contextlib.contextmanager
def _without_autocast_wrapper(model: torch.nn.Module):
    """``model``'s forward without the mixed-precision autocast that ``accelerate.prepare`` wraps
    it in (its ``_original_forward``); module hooks (FSDP's) still run."""
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class _Pass(NamedTuple):
    """One of TRL's forwards, observed: log-probs of the sampled tokens, the backbone's hidden
    states before each of them (None unless the estimator needs logits), and whether it was the
    reference's (a separate ``ref_model``, or the PEFT model with its adapters disabled)."""

    logps: torch.Tensor
    hidden: torch.Tensor | None
    reference: bool


class KLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose KL term is ``kl_estimators.per_token_kl_loss(kl_estimator, ...)``.

    Loss = TRL's policy loss + beta x aggregate_loss_type(per-token KL term), where the per-token
    term's gradient is the named estimator (its expectation: ``ESTIMATOR_INFO[kl_estimator]``) and
    the aggregation is the one TRL applies to its own per-token loss for ``args.loss_type``.
    ``weight_clip`` and ``chunk_size`` are passed to ``per_token_kl_loss``. Every argument is
    checked before any model loads.

    Metrics: ``kl`` = the per-token mean over all processes of the term's value (a KL estimate;
    TRL's own ``kl`` for "k3-loss" / "k3-ratio"), which depends on neither gradient accumulation,
    ``loss_type`` nor train/eval; ``kl_estimator_loss`` = the aggregated term before beta, for
    one optimiser step (x the accumulation steps in training), as it enters the loss.

    Args:
        model: as ``GRPOTrainer``'s: a model id or path, or a loaded causal LM (PEFT included).
        reward_funcs: as ``GRPOTrainer``'s: one reward function or model, or a list of them.
        args: a ``GRPOConfig`` with ``beta > 0`` (the KL coefficient); its ``loss_type`` sets the
            aggregation, and its sampling must be the full softmax (no top_k, top_p, min_p, ...).
        *rest: ``GRPOTrainer``'s further positional arguments.
        kl_estimator: a name of ``ESTIMATOR_INFO``; its gradient is the KL term's. ``"analytic*"``
            needs the exact logits (refused for soft-capped models and PEFT output layers).
        weight_clip: c (each importance weight becomes min(w, c)) or (lo, hi), or None.
        chunk_size: positions per chunk of ``fused_kl``; None: ``auto_chunk_size(V)`` (64 MiB of logits).
        product_dtype: for ``"analytic*"``, the dtype of the output layer's products in ``fused_kl``
            (``LinearLogits.product_dtype``; a torch dtype or its name). None: float32, whatever
            ``bf16`` says. ``"bfloat16"``: the products TRL's own head runs under ``bf16=True``,
            faster where bfloat16 products are, at about 10x the KL's error of a float32 head
            (SmolLM2-135M, docs/benchmarks.md).
        **kwargs: ``GRPOTrainer``'s keyword arguments (``train_dataset``, ``peft_config``, ...).

    Raises:
        ValueError: a bad argument, a truncated or reshaped sampler, ``"k3-ratio"`` at
            ``importance_sampling_level="sequence"``, or (for ``analytic*``) logits that are not
            s (h W^T + b) / T; all but the last before any model loads.
    """

    def __init__(self, model: Any, reward_funcs: Any, args: Any = None, *rest: Any, kl_estimator: str = "analytic-future-is",
                 weight_clip: Any = None, chunk_size: int | None = None, product_dtype: Any = None, **kwargs: Any) -> None:
        check_kl_arguments(kl_estimator, getattr(args, "beta", 0.0), weight_clip, chunk_size, product_dtype)
        check_loss_type(kl_estimator, args.loss_type)
        check_importance_level(kl_estimator, args.importance_sampling_level)
        check_zero3(kl_estimator, getattr(args, "deepspeed", None))
        check_sampler({"top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, **(args.generation_kwargs or {})})
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.kl_estimator = kl_estimator
        self.kl_weight_clip = weight_clip
        self.kl_chunk_size = chunk_size
        self.kl_product_dtype = product_dtype_of(product_dtype)
        self._captured: list[_Pass] | None = None
        self._checked_output_layers: set[tuple[int, bool]] = set()
        if ESTIMATOR_INFO[kl_estimator].needs_logits:
            self._logit_scale = self._check_logit_transform()

    def _check_logit_transform(self) -> float:
        """The logit scale s (z = s (h W^T + b) / T) of the policy, which the reference shares;
        ValueError for a soft-capped or non-positively scaled model, or a PEFT output layer."""
        policy = self.accelerator.unwrap_model(self.model)
        scale, cap = logit_transform(policy.config)
        if cap is not None or not scale > 0:
            raise ValueError(
                f"this model's logits are soft-capped ({cap}) or scaled by {scale}: kl_estimator={self.kl_estimator!r} "
                "needs logits s (h W^T + b) / T with s > 0; use a sampled estimator such as 'reinforce-future-is'"
            )
        output_layer(policy)
        return scale

    # -- TRL's forwards, observed ------------------------------------------------------------------
    def _is_reference(self, model: torch.nn.Module) -> bool:
        if model is self.ref_model:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        return bool(getattr(unwrapped, "_adapters_disabled", False)) or getattr(unwrapped, "active_adapter", None) == "ref"

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._captured is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        reference = self._is_reference(model)
        hidden: list[torch.Tensor] = []
        handle = None
        if ESTIMATOR_INFO[self.kl_estimator].needs_logits:
            self._check_output_layer(model, input_ids, attention_mask, reference)
            handle = _backbone(self.accelerator.unwrap_model(model)).register_forward_hook(
                lambda _module, _inputs, output: hidden.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
            )
        try:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self._captured.append(_Pass(out[0], torch.cat(hidden) if hidden else None, reference))
        return out

    def _check_output_layer(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reference: bool) -> None:
        """Once per model: its own forward's logits (the sampler's, in float32 where its weights are) equal
        s (h W^T + b), with h its backbone's hidden states, to the rounding of the logits' dtype.

        Raises ValueError where they differ (a scaling or cap the config does not declare)."""
        unwrapped = self.accelerator.unwrap_model(model)
        key = (id(unwrapped), reference)
        if key in self._checked_output_layers:
            return
        hidden: list[torch.Tensor] = []
        handle = _backbone(unwrapped).register_forward_hook(lambda _m, _i, output: hidden.append(output.last_hidden_state))
        try:
            with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                with _without_autocast_wrapper(unwrapped):
                    logits = unwrapped(input_ids=input_ids[:1], attention_mask=attention_mask[:1]).logits
                weight, bias = output_layer(unwrapped)
                ours = torch.nn.functional.linear(hidden[0].to(weight.dtype), weight, bias).double() * self._logit_scale
        finally:
            handle.remove()
        theirs = logits.double()
        mismatch = float((ours - theirs).abs().max())
        tolerance = 4 * torch.finfo(logits.dtype).eps * max(1.0, float(theirs.abs().max()))
        if mismatch > tolerance:
            raise ValueError(
                f"this model's logits are not {self._logit_scale:g} x lm_head(h) (they differ by {mismatch:.2g} > {tolerance:.2g}): "
                f"kl_estimator={self.kl_estimator!r} is not supported for it; use a sampled estimator such as 'reinforce-future-is'"
            )
        self._checked_output_layers.add(key)

    def _generate_and_score_completions(self, inputs):
        if not ESTIMATOR_INFO[self.kl_estimator].needs_logits:
            return super()._generate_and_score_completions(inputs)
        self._captured = []
        try:
            output = super()._generate_and_score_completions(inputs)
            ref_hidden = [p.hidden for p in self._captured if p.reference]
        finally:
            self._captured = None
        output["ref_hidden_states"] = torch.cat(ref_hidden).detach()
        return output

    # -- the loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        beta, self.beta, self._captured = self.beta, 0.0, []
        try:
            loss = super()._compute_loss(model, inputs)
            (logps, hidden, _), = [p for p in self._captured if not p.reference]
        finally:
            self.beta, self._captured = beta, None
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logits = ref_logits = None
        if hidden is not None:
            logits = self._linear_logits(model, hidden)
            ref_logits = self._linear_logits(model if self.ref_model is None else self.ref_model, inputs["ref_hidden_states"], detach=True)
        terms = per_token_kl_loss(
            self.kl_estimator, logps, inputs["ref_per_token_logps"], mask.bool(), logits, ref_logits,
            behaviour_logprobs=inputs.get("old_per_token_logps"),
            weight_clip=self.kl_weight_clip, chunk_size=self.kl_chunk_size,
        )
        kl_loss = self.aggregate(terms, mask, inputs)
        mode = "train" if self.model.training else "eval"
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        self._metrics[mode]["kl_estimator_loss"].append(self.accelerator.gather(kl_loss.detach() * steps).mean().item())
        totals = self.accelerator.reduce(torch.stack([(terms.detach() * mask).sum(), mask.sum().to(terms.dtype)]), reduction="sum")
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss + beta * kl_loss.to(loss.dtype)

    def _linear_logits(self, model, hidden: torch.Tensor, detach: bool = False) -> LinearLogits:
        """The logits s (h W^T + b) / temperature as ``LinearLogits`` (never materialised)."""
        weight, bias = output_layer(self.accelerator.unwrap_model(model))
        if detach:
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return LinearLogits(hidden, weight, bias, float(self.temperature) / self._logit_scale, self.kl_product_dtype)

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

    # -- checkpoints ---------------------------------------------------------------------------------
    def _estimator_record(self) -> dict[str, Any]:
        clip = list(self.kl_weight_clip) if isinstance(self.kl_weight_clip, tuple) else self.kl_weight_clip
        return {"kl_estimator": self.kl_estimator, "weight_clip": clip}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, ESTIMATOR_FILE), "w") as f:
                json.dump(self._estimator_record(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, ESTIMATOR_FILE)):
            with open(os.path.join(checkpoint, ESTIMATOR_FILE)) as f:
                saved = json.load(f)
            if saved != self._estimator_record():
                raise ValueError(
                    f"the checkpoint {checkpoint} was trained with {saved}, not {self._estimator_record()}: resume with "
                    "the same kl_estimator and weight_clip, or start a new run"
                )
        super()._load_optimizer_and_scheduler(checkpoint)
