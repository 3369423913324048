"""Checks of a TRL trainer's KL settings, all run before any model loads, and a model's logit
transform read from its config exactly as TRL 1.16's fused LM head reads it.

Used by ``KLGRPOTrainer`` (``kl_estimators.integrations.trl``); each failure is a one-line
``ValueError`` naming the argument.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from kl_estimators.fused import PRODUCT_DTYPES
from kl_estimators.info import ESTIMATOR_INFO
from kl_estimators.weights import check_weight_clip

# Divide the token sum by a constant (the guarantees of ESTIMATOR_INFO hold); the others divide each
# sequence or micro-batch by its own token count.
CONSTANT_NORMALISER_LOSS_TYPES = ("dapo", "dr_grpo", "luspo", "cispo", "vespo")

# Sampler options under which the tokens do not come from softmax(logits / temperature), with the
# value at which each is neutral (None is neutral for all). TRL's log-probs (and so pi, mu and
# pi_ref of every estimator) are those of the untruncated softmax(logits / temperature).
_NEUTRAL_SAMPLER_OPTIONS: dict[str, Any] = {
    "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "top_h": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": [], "suppress_tokens": [], "begin_suppress_tokens": [],
    "sequence_bias": {}, "do_sample": True, "num_beams": 1,
}


def check_kl_arguments(kl_estimator: Any, beta: Any, weight_clip: Any, chunk_size: Any, product_dtype: Any = None) -> None:
    """ValueError unless ``kl_estimator`` is a name of ``ESTIMATOR_INFO``, ``beta`` a finite number
    > 0, ``weight_clip`` None, a finite c > 0 or a finite pair 0 <= lo <= hi, ``chunk_size``
    None or an int >= 1, and ``product_dtype`` None or (for an estimator that needs logits) a
    dtype of ``product_dtype_of``.

    Args:
        kl_estimator: the estimator's name.
        beta: the KL coefficient.
        weight_clip: the clip of every importance weight (``kl_estimators.weights``).
        chunk_size: rows per chunk of the fused KL.
        product_dtype: the output layer's product dtype in the fused KL (``LinearLogits.product_dtype``).
    """
    if not isinstance(kl_estimator, str) or kl_estimator not in ESTIMATOR_INFO:
        raise ValueError(f"kl_estimator must be one of {tuple(ESTIMATOR_INFO)}, got {kl_estimator!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"KLGRPOTrainer needs GRPOConfig(beta > 0), finite: beta is the KL coefficient, got {beta!r}")
    check_weight_clip(weight_clip)  # finite and in range
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if product_dtype_of(product_dtype) is not None and not ESTIMATOR_INFO[kl_estimator].needs_logits:
        raise ValueError(f"product_dtype sets the output layer's products of the exact KL; kl_estimator={kl_estimator!r} "
                         "uses no logits (leave product_dtype None)")


def product_dtype_of(value: Any) -> torch.dtype | None:
    """``value`` as a ``LinearLogits.product_dtype``: None, a torch dtype of ``PRODUCT_DTYPES`` or its
    name (``"bfloat16"``, as Hugging Face's ``dtype=`` takes it); ValueError for anything else.

    Args:
        value: None, a ``torch.dtype`` or a dtype's name.

    Returns:
        The torch dtype, or None.
    """
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if value is None or dtype in PRODUCT_DTYPES:
        return dtype
    names = tuple(str(d).removeprefix("torch.") for d in PRODUCT_DTYPES)
    raise ValueError(f"product_dtype must be None or one of {names}, got {value!r}")


def check_loss_type(kl_estimator: str, loss_type: str) -> None:
    """ValueError where ``loss_type`` normalises by per-sequence or per-micro-batch token counts and
    ``kl_estimator`` is unbiased (which that normalisation would bias)."""
    info = ESTIMATOR_INFO[kl_estimator]
    if (info.unbiased_on_policy or info.unbiased_off_policy) and loss_type not in CONSTANT_NORMALISER_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} normalises each sequence or micro-batch by its own token count, which "
            f"biases kl_estimator={kl_estimator!r}: use one of {CONSTANT_NORMALISER_LOSS_TYPES}"
        )


def check_importance_level(kl_estimator: str, level: str) -> None:
    """ValueError for ``"k3-ratio"`` at ``importance_sampling_level="sequence"``.

    The level sets TRL's policy-term ratio; every estimator's KL term keeps its own weights (the
    ``-is`` estimators' per-decision W_t are unbiased whatever the policy term uses). "k3-ratio" is
    TRL's token-level bias correction rho_t k3_t; at the sequence level TRL weights k3 by
    exp(mean_t log rho_t), which is no importance weight, so neither reading is right there.
    """
    if kl_estimator == "k3-ratio" and level == "sequence":
        raise ValueError(
            "kl_estimator='k3-ratio' weights by the token ratio, not the sequence level asked by "
            "importance_sampling_level='sequence': use 'analytic-future-is' or 'reinforce-future-is' (unbiased at any level)"
        )


def check_sampler(options: dict[str, Any]) -> None:
    """ValueError where a sampler option truncates or reshapes softmax(logits / temperature).

    ``options``: GRPOConfig's ``top_k``, ``top_p``, ``min_p`` and its ``generation_kwargs``, merged.
    Sampling from a truncated pi^M while TRL scores the untruncated pi (and mu, pi_ref) is
    off-policy with a behaviour policy of smaller support: no estimator then follows
    grad KL(pi || pi_ref) or grad KL(pi^M || pi_ref) (``tests/test_frameworks_trl_truncation.py``).
    """
    for name, neutral in _NEUTRAL_SAMPLER_OPTIONS.items():
        value = options.get(name)
        if value is not None and value != neutral:
            raise ValueError(
                f"{name}={value!r} samples from a distribution other than softmax(logits / temperature), which TRL "
                f"scores: no KL estimator is then right (docs/is-my-kl-right.md); set {name}={neutral!r}"
            )


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(logit scale s, final soft-cap c or None) of a causal LM, read as TRL 1.16's
    ``add_fused_lm_head`` reads them: its log-probs are those of z = cap_c(s (h W^T + b)) / T.

    Args:
        config: the model's ``PretrainedConfig``.

    Returns:
        ``(s, c)``: s from ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` or
        1 / ``logits_scaling`` (``logits_scaling`` itself for HyperCLOVA X), 1.0 when none is set.
    """
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def check_zero3(kl_estimator: str, deepspeed: Any) -> None:
    """ValueError for an analytic estimator under DeepSpeed ZeRO-3.

    ``deepspeed``: ``TrainingArguments.deepspeed`` (a config dict, a JSON file's path, or None);
    the stage can also come from accelerate's ``ACCELERATE_DEEPSPEED_ZERO_STAGE``. Under ZeRO-3 the
    output layer's weight is an empty placeholder outside its module's forward, and this trainer
    reads it after TRL's forwards (FSDP2's DTensor shards, by contrast, are gathered).
    """
    if not ESTIMATOR_INFO[kl_estimator].needs_logits:
        return
    config = deepspeed
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    stage = (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if stage is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and str(stage) == "3":
        raise ValueError(
            f"kl_estimator={kl_estimator!r} reads the output layer's weight, which DeepSpeed ZeRO-3 partitions away: "
            "use FSDP2, ZeRO-2, or a sampled estimator such as 'reinforce-future-is'"
        )
