"""Tiny offline ``GRPOTrainer``s and ``RLOOTrainer``s for the TRL tests (trl 1.16.0 on CPU, a tiny Llama from conftest)."""

from __future__ import annotations

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig


def grpo_config(tmp_path, **overrides) -> GRPOConfig:
    """A CPU GRPOConfig with beta > 0, short completions and no logging or saving."""
    options = dict(
        output_dir=str(tmp_path / "grpo"), beta=0.1, num_generations=4, per_device_train_batch_size=4,
        max_completion_length=4, max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        logging_steps=1, disable_tqdm=True, seed=0, bf16=False,
    )
    options.update(overrides)
    return GRPOConfig(**options)


def build(trainer_class, model_path: str, tokenizer, tmp_path, reward_funcs=None, prompts=("this movie was", "the plot"),
          **kwargs) -> GRPOTrainer:
    """``trainer_class`` on the tiny model; ``kwargs`` go to GRPOConfig except the trainer's own (``kl_*``)."""
    trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("kl_estimator", "weight_clip", "chunk_size", "product_dtype", "peft_config")}
    dataset = Dataset.from_dict({"prompt": list(prompts) * 4})
    reward_funcs = reward_funcs or (lambda completions, **_: [float(len(c)) for c in completions])
    trainer = trainer_class(model=model_path, reward_funcs=reward_funcs, args=grpo_config(tmp_path, **kwargs),
                            train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    trainer.model.train()
    return trainer


def batch(model, ref_model, generator: torch.Generator, B: int = 4, T: int = 4, vocab: int = 20, shift: float = 0.3) -> dict:
    """Inputs of ``_compute_loss``: random completions of different lengths, reference log-probs from
    ``ref_model``, old log-probs from the policy perturbed by up to ``shift`` (as after a step), advantages."""
    prompt_ids = torch.randint(3, vocab, (B, 2), generator=generator)
    completion_ids = torch.randint(3, vocab, (B, T), generator=generator)
    lengths = torch.arange(T, 0, -1).repeat(B)[:B].clamp(min=1)
    completion_mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        def logps(m):
            logits = m(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float()
            return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        current = logps(model)
        ref = logps(ref_model)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=generator),
        "old_per_token_logps": current + shift * (2 * torch.rand(B, T, generator=generator) - 1),
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }


def perturb(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Move the policy away from the reference (TRL loads both from the same weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def rloo_reward(completion_ids, **_):
    """A deterministic reward of the completion's token ids, in [0, 1)."""
    return [float(sum(ids) % 7) / 7 for ids in completion_ids]


def build_rloo(trainer_class, tiny_lm_path, tiny_tokenizer, tmp_path, prompts=("this movie was", "the plot"), **kwargs):
    """``trainer_class`` (RLOOTrainer or KLRLOOTrainer) on the tiny model, beta 0.1, groups of 4, its reference perturbed."""
    trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("kl_estimator", "weight_clip", "chunk_size", "product_dtype", "peft_config")}
    reward_funcs = kwargs.pop("reward_funcs", rloo_reward)
    options = dict(output_dir=str(tmp_path / "rloo"), beta=0.1, num_generations=4, per_device_train_batch_size=4,
                   max_completion_length=4, max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                   logging_steps=1, disable_tqdm=True, seed=0, bf16=False)
    options.update(kwargs)
    trainer = trainer_class(model=tiny_lm_path, reward_funcs=reward_funcs,
                            args=RLOOConfig(**options), train_dataset=Dataset.from_dict({"prompt": list(prompts) * 4}),
                            processing_class=tiny_tokenizer, **trainer_kwargs)
    perturb(trainer.model)  # TRL loads policy and reference from the same weights
    trainer.model.train()
    return trainer


def fixed_batch(model_path: str, seed: int = 0) -> dict:
    """``batch`` from plain (unsharded) copies of the policy (``perturb``ed) and the reference, with
    the reference's hidden states: the same inputs in every process."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_path)
    reference = AutoModelForCausalLM.from_pretrained(model_path)
    perturb(policy)
    inputs = batch(policy, reference, torch.Generator().manual_seed(seed), B=4)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        inputs["ref_hidden_states"] = reference.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -T - 1 : -1]
    return inputs


def sharded_half(inputs: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s rows of ``inputs`` (contiguous blocks); ``num_items_in_batch`` stays the
    whole batch's token count, as TRL gathers it across processes."""
    rows = inputs["completion_ids"].shape[0] // world
    part = {k: v[rank * rows : (rank + 1) * rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    part["num_items_in_batch"] = inputs["num_items_in_batch"]
    return part


# A one-token bandit from "this movie was" whose optimum pi*(S) is known in closed form: reward 1
# for a first token in REWARDED, else 0 (the GRPO and RLOO training tests).
REWARDED = tuple(range(10, 20))
BANDIT_PROMPT = "this movie was"
BANDIT_GROUP, BANDIT_BETA = 16, 0.5


def bandit_reward(completion_ids, **_):
    """1 where the completion's first token is in ``REWARDED``, else 0."""
    return [float(ids[0] in REWARDED) for ids in completion_ids]


def mass_on_rewarded(model, tokenizer) -> float:
    """pi(S | prompt): the model's probability of a first token in ``REWARDED``."""
    ids = tokenizer(BANDIT_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        probabilities = model(input_ids=ids).logits[0, -1].double().softmax(-1)
    return probabilities[list(REWARDED)].sum().item()
