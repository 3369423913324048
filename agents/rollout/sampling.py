"""Batched sampling of one episode per env with the policy's KV cache.

Each step costs one policy forward of length 1 for the whole batch (the prompt is encoded once).
pi_ref's logits at every state come from the env's info per step, or from the agent's reference
(``agents.rollout.reference.Reference``) in one forward after sampling, and
the exact per-position KL is computed here. With ``fused_reference`` no logits are kept: pi_ref's
final hidden states come from one forward after sampling, and KL_t and log pi_ref(y_t) from both
models' hidden states through ``kl_estimators.fused_kl`` (``ref_logits="hidden"``).

With action masks (``agents.rollout.masking``) the policy that samples is the masked pi^M: its logits are
-inf outside the mask, the action and its log-prob come from sb3-contrib's ``MaskableCategorical``,
the mask is stored with the step, and the analytic KL is KL(pi^M(.|s_t) || pi_ref(.|s_t)).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from sb3_contrib.common.maskable.distributions import MaskableCategorical

import kl_estimators
from agents.rollout.categorical import sample_categorical, sample_multinomial
from agents.rollout.masking import StepMasks, masked_logits
from agents.policy import CausalLMPolicy
from agents.rollout.records import SampledStep
from agents.rollout.reference import Reference, linear_logits
from agents.vec_env import LMGymVecEnv
from lmgym.decoding import LockstepDecoder
from lmgym.task import log_prob


def trim_left_padding(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row of a left-padded batch."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, dtype=torch.long)
    used = mask.any(dim=0)
    first = int(used.long().argmax()) if bool(used.any()) else mask.shape[1]
    return ids[:, first:], mask[:, first:]


def set_reference_terms(step: SampledStep, logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    """Fill ``step``'s pi_ref terms in place from the policy's and pi_ref's logits [N, V] at s_t:
    the logits, log pi_ref(a_t | s_t) and KL(pi(.|s_t) || pi_ref(.|s_t))."""
    step.ref_logits = ref_logits
    step.ref_logprobs = log_prob(ref_logits, step.actions)
    with torch.no_grad():
        step.analytic_kl = kl_estimators.analytic(logits, ref_logits)


def sample_episodes(
    policy: CausalLMPolicy,
    env: LMGymVecEnv,
    reference: Reference,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_steps: int,
    masks: StepMasks | None = None,
    fused_reference: bool = False,
    chunk_size: int | None = None,
    sampler: str = "inverse-cdf",
) -> Iterator[SampledStep]:
    """Step ``env`` (at the start of an episode in every sub-env, whose prompts are given) until
    every env has finished that episode or ``max_steps`` steps were taken.

    pi_ref's logits come from the env's info at each step (each step is yielded as it is taken) or,
    for an env built with ``step_ref_logits=False``, from one forward of ``reference`` over the
    sampled sequences after the last step (the steps are yielded then). ``masks``: sample from the masked
    policy (module docstring). ``fused_reference``: in the latter case, score pi_ref from hidden
    states (module docstring; ``chunk_size`` rows of logits at a time, None: automatic) and give
    each step its ``ref_hidden``. ``sampler``: ``"inverse-cdf"`` (``sample_categorical``) or
    ``"multinomial"`` (``sample_multinomial``: HF ``generate``'s tokens for the same seed); with
    ``masks``, sb3-contrib's ``MaskableCategorical`` draws either way.
    """
    device = policy.device
    draw = {"inverse-cdf": sample_categorical, "multinomial": sample_multinomial}[sampler]
    per_step_ref = env.step_ref_logits
    fused_reference = fused_reference and not per_step_ref
    if fused_reference and masks is not None:
        raise ValueError("fused_reference does not support action masks (the fused KL has no mask over the vocabulary)")
    extra_models = masks.models if masks is not None else []
    decoding = LockstepDecoder([policy.lm, *extra_models], prompt_ids.to(device), prompt_mask.to(device), output_hidden=(True,))
    active = torch.ones(env.num_envs, dtype=torch.bool)
    pending: list[tuple[SampledStep, torch.Tensor]] = []  # steps waiting for pi_ref, with pi's logits
    for t in range(max_steps):
        ref_logits = torch.from_numpy(np.array(env.current_ref_logits, dtype=np.float32)) if per_step_ref else None
        out = decoding.outputs[0]
        with torch.no_grad():
            logits = out.logits.float().cpu()
            values = policy.values_from_hidden(out.hidden).cpu()
            if masks is None:
                step_masks = None
                actions, logprobs = draw(logits)
            else:
                step_masks = masks.current(decoding.outputs[1:])
                dist = MaskableCategorical(logits=logits, masks=step_masks)
                logits = masked_logits(logits, step_masks)
                actions = dist.sample()
                logprobs = dist.log_prob(actions)
        new_obs, rewards, dones, infos = env.step(actions.numpy())
        step = SampledStep(
            active=active.clone(),
            actions=actions,
            logprobs=logprobs,
            values=values,
            rewards=rewards,
            dones=dones,
            infos=infos,
            new_obs=new_obs,
            action_masks=step_masks,
        )
        if per_step_ref:
            set_reference_terms(step, logits, ref_logits)
            yield step
        else:
            pending.append((step, out.hidden if fused_reference else logits))
        active &= ~torch.as_tensor(dones)
        if not active.any() or t + 1 == max_steps:
            break
        decoding.append(actions.to(device))
    if pending and fused_reference:
        yield from with_fused_reference(policy, reference, prompt_ids, prompt_mask, pending, chunk_size)
    elif pending:
        input_ids, attention_mask = sampled_sequences(prompt_ids, prompt_mask, [step for step, _ in pending])
        ref_logits = reference.logits(input_ids, attention_mask, len(pending)).cpu()
        for t, (step, logits) in enumerate(pending):
            set_reference_terms(step, logits, ref_logits[:, t])
            yield step


def with_fused_reference(
    policy: CausalLMPolicy,
    reference: Reference,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pending: list[tuple[SampledStep, torch.Tensor]],
    chunk_size: int | None,
) -> Iterator[SampledStep]:
    """The sampled steps (each with the policy's final hidden state [N, d] at s_t) with pi_ref's
    hidden state, log pi_ref(a_t) and KL_t, from one reference forward (logits at one position per
    row) and ``fused_kl`` over all T steps at once (no ``[N, T, V]`` tensor)."""
    steps = [step for step, _ in pending]
    input_ids, attention_mask = sampled_sequences(prompt_ids, prompt_mask, steps)
    actions, active = input_ids[:, -len(steps) :], attention_mask[:, -len(steps) :].bool()
    device = policy.device
    ref_hidden = reference.hidden(input_ids.to(device), attention_mask.to(device), len(steps))
    policy_hidden = torch.stack([hidden for _, hidden in pending], dim=1)
    with torch.no_grad():
        scored = kl_estimators.fused_kl(
            linear_logits(policy.lm, policy_hidden.to(device)),
            reference.output_layer(ref_hidden),
            actions.to(device),
            active.to(device),
            chunk_size,
        )
    ref_logprobs, kl, ref_hidden = scored.ref_logprobs.float().cpu(), scored.kl.float().cpu(), ref_hidden.cpu()
    for t, step in enumerate(steps):
        step.ref_logprobs, step.analytic_kl, step.ref_hidden = ref_logprobs[:, t], kl[:, t], ref_hidden[:, t]
        yield step


def sampled_sequences(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, steps: list[SampledStep]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + actions [N, P + T] and their attention mask, in which actions taken after a row's
    episode ended are masked out."""
    actions = torch.stack([step.actions for step in steps], dim=1)
    active = torch.stack([step.active for step in steps], dim=1)
    return torch.cat([prompt_ids, actions], dim=1), torch.cat([prompt_mask, active.long()], dim=1)
