"""KLGRPOTrainer in the common TRL set-ups (trl 1.16.0 on CPU, tiny models from conftest): argument
checks before any model loads, the ``kl`` metric, the logit check, checkpoints, PEFT/LoRA.

Each test compares with a computation from the models' full logits or with TRL's own trainer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

import kl_estimators as kl  # noqa: E402
from kl_estimators.integrations import trl_checks  # noqa: E402
from kl_estimators.integrations.trl import ESTIMATOR_FILE, KLGRPOTrainer  # noqa: E402
from tests.helpers.trl_setup import batch, build, grpo_config, perturb  # noqa: E402

LOSS_TYPES = ("dapo", "grpo", "sapo", "bnpo", "dr_grpo", "luspo", "cispo", "vespo")


# -- 1. arguments, before any model loads ---------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "trainer_kwargs", "message"), (
    ({}, dict(kl_estimator="k9"), "kl_estimator must be one of"),
    (dict(beta=0.0), {}, "beta > 0"),
    (dict(beta=float("nan")), {}, "beta > 0"),
    (dict(beta=-0.1), {}, "beta > 0"),
    (dict(beta=float("inf")), {}, "beta > 0"),
    ({}, dict(weight_clip=0.0), "weight_clip"),
    ({}, dict(weight_clip=-1.0), "weight_clip"),
    ({}, dict(weight_clip=float("nan")), "weight_clip"),
    ({}, dict(weight_clip=float("inf")), "weight_clip must be None.*finite"),
    ({}, dict(weight_clip=(0.0, float("inf"))), "weight_clip must be None.*finite"),
    ({}, dict(chunk_size=0), "chunk_size"),
    ({}, dict(chunk_size=1.5), "chunk_size"),
    ({}, dict(chunk_size=True), "chunk_size"),
    ({}, dict(product_dtype="int8"), "product_dtype must be None or one of"),
    ({}, dict(product_dtype=torch.int32), "product_dtype must be None or one of"),
    ({}, dict(kl_estimator="k3-loss", product_dtype="bfloat16"), "uses no logits"),
    (dict(loss_type="grpo"), {}, "biases kl_estimator"),
    (dict(importance_sampling_level="sequence", loss_type="luspo"), dict(kl_estimator="k3-ratio"), "token ratio"),
    (dict(top_k=5), {}, "top_k=5 samples"),
    (dict(top_p=0.9), {}, "top_p=0.9 samples"),
    (dict(min_p=0.1), {}, "min_p=0.1 samples"),
    (dict(generation_kwargs={"repetition_penalty": 1.1}), {}, "repetition_penalty=1.1 samples"),
))
def test_refuses_before_any_model_loads(tmp_path, kwargs, trainer_kwargs, message):
    """A model path that does not exist: a check that ran after loading would raise OSError instead."""
    with pytest.raises(ValueError, match=message):
        KLGRPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=lambda **_: [], args=grpo_config(tmp_path, **kwargs),
                      **trainer_kwargs)


@pytest.mark.parametrize("estimator", ("analytic-future-is", "reinforce-future-is"))
def test_zero3_refuses_the_analytic_estimators(tmp_path, monkeypatch, estimator):
    """ZeRO-3 (here from accelerate's environment variable: DeepSpeed is not installed) partitions the
    output layer away: refused for the analytic estimators before loading; a sampled one passes the check."""
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if estimator.startswith("analytic"):
        with pytest.raises(ValueError, match="ZeRO-3"):
            trl_checks.check_zero3(estimator, None)
        with pytest.raises(ValueError, match="ZeRO-3"):
            KLGRPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=lambda **_: [], args=grpo_config(tmp_path))
    else:
        trl_checks.check_zero3(estimator, None)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if estimator.startswith("analytic"):
        with pytest.raises(ValueError, match="ZeRO-3"):
            trl_checks.check_zero3(estimator, str(path))
    trl_checks.check_zero3("analytic-future-is", {"zero_optimization": {"stage": 2}})


def test_no_args_is_refused_before_loading(tmp_path):
    """Without args TRL would build GRPOConfig(beta=0.0): refused, naming beta."""
    with pytest.raises(ValueError, match="beta > 0"):
        KLGRPOTrainer(model=str(tmp_path / "no-such-model"), reward_funcs=lambda **_: [])


@pytest.mark.parametrize("estimator", ("analytic-future-is", "reinforce-future-is", "k3-loss", "k3+is"))
def test_sequence_level_keeps_each_estimators_own_weights(tiny_lm_path, tiny_tokenizer, tmp_path, estimator):
    """importance_sampling_level only sets TRL's policy-term ratio: with zero advantages the loss
    (the KL term alone) is the same at both levels, so each estimator keeps the weights that make it
    what ``ESTIMATOR_INFO`` states (proven by enumeration in tests/test_kl_expectations.py)."""
    losses = []
    for level in ("token", "sequence"):
        trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / level, kl_estimator=estimator,
                        importance_sampling_level=level, loss_type="luspo")
        perturb(trainer.model)
        inputs = _inputs_with_ref_hidden(trainer, seed=3)
        losses.append(trainer._compute_loss(trainer.model, inputs).detach())
    assert losses[0].abs() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0.0)


# -- 2. the kl metric -----------------------------------------------------------------------------------

def _inputs_with_ref_hidden(trainer, seed: int) -> dict:
    """``batch`` plus the reference's hidden states (what ``_generate_and_score_completions`` stores)."""
    ref = trainer.ref_model
    inputs = batch(trainer.model, ref, torch.Generator().manual_seed(seed))
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        inputs["ref_hidden_states"] = ref.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -T - 1 : -1]
    return inputs


def _full_logit_terms(trainer, inputs, estimator):
    """per_token_kl_loss from each model's materialised logits / T (the policy's with gradient)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    with torch.no_grad():
        ref_logits = trainer.ref_model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    logps = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].bool()
    return kl.per_token_kl_loss(estimator, logps, inputs["ref_per_token_logps"], mask, logits, ref_logits,
                                behaviour_logprobs=inputs["old_per_token_logps"])


@pytest.mark.parametrize("accumulation", (1, 2))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_metric_is_trls_for_k3(tiny_lm_path, tiny_tokenizer, tmp_path, loss_type, accumulation):
    """KLGRPOTrainer("k3-loss") logs TRL's own ``kl`` (GRPOTrainer, use_bias_correction_kl=False): the
    per-token mean of k3, the same for every loss_type and accumulation, in training and in evaluation."""
    settings = dict(loss_type=loss_type, use_bias_correction_kl=False, gradient_accumulation_steps=accumulation)
    theirs = build(GRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "trl", **settings)
    ours = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "ours", kl_estimator="k3-loss", **settings)
    perturb(theirs.model)
    perturb(ours.model)
    inputs = batch(theirs.model, theirs.ref_model, torch.Generator().manual_seed(0))
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        logps = _full_logit_terms(ours, inputs, "k1-loss") + inputs["ref_per_token_logps"]  # k1 + log pi_ref = log pi
        expected = kl.k3(logps, inputs["ref_per_token_logps"], mask).sum() / mask.sum()
    for trainer in (theirs, ours):
        trainer._compute_loss(trainer.model, inputs)
        trainer.model.eval()
        trainer._compute_loss(trainer.model, inputs)
    for mode in ("train", "eval"):
        assert ours._metrics[mode]["kl"] == pytest.approx(theirs._metrics[mode]["kl"], rel=1e-5)
        assert ours._metrics[mode]["kl"][0] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("accumulation", (1, 2))
@pytest.mark.parametrize("loss_type", trl_checks.CONSTANT_NORMALISER_LOSS_TYPES)
def test_kl_metric_is_the_per_token_mean(tiny_lm_path, tiny_tokenizer, tmp_path, loss_type, accumulation):
    """analytic-future-is: ``kl`` = the per-token mean of the term's value (sg(W_{t-1}) KL_t, from full
    logits), the same in training and evaluation, whatever loss_type and accumulation; the loss term
    is logged as ``kl_estimator_loss`` = TRL's aggregation of the terms x the accumulation steps."""
    trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, loss_type=loss_type,
                    gradient_accumulation_steps=accumulation)
    perturb(trainer.model)
    inputs = _inputs_with_ref_hidden(trainer, seed=4)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        terms = _full_logit_terms(trainer, inputs, "analytic-future-is")
    expected = ((terms * mask).sum() / mask.sum()).item()
    trainer._compute_loss(trainer.model, inputs)
    aggregate = trainer.aggregate(terms, mask, inputs).item() * accumulation
    trainer.model.eval()
    trainer._compute_loss(trainer.model, inputs)
    assert expected > 1e-3
    assert trainer._metrics["train"]["kl"][0] == pytest.approx(expected, rel=1e-4)
    assert trainer._metrics["eval"]["kl"][0] == pytest.approx(expected, rel=1e-4)
    assert trainer._metrics["train"]["kl_estimator_loss"][0] == pytest.approx(aggregate, rel=1e-4)


# -- 3. the logit check ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_granite_path(tmp_path_factory, tiny_tokenizer):
    """A Granite causal LM: logits = lm_head(h) / logits_scaling (1.02), a scale only its config declares."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(5)
    config = GraniteConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=1.02, initializer_range=0.3,
                           pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=None)
    path = tmp_path_factory.mktemp("tiny_granite")
    GraniteForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_scaled_logits_are_exact(tiny_granite_path, tiny_tokenizer, tmp_path):
    """Granite (logits_scaling 1.02, read from the config as TRL reads it): the analytic loss and its
    gradient equal those of the model's own logits / T (float32, tolerance 1e-4)."""
    trainer = build(KLGRPOTrainer, tiny_granite_path, tiny_tokenizer, tmp_path, temperature=0.7)
    perturb(trainer.model)
    inputs = _inputs_with_ref_hidden(trainer, seed=5)
    terms = _full_logit_terms(trainer, inputs, "analytic-future-is")
    expected = trainer.beta * (terms * inputs["completion_mask"]).sum() / inputs["num_items_in_batch"]
    loss = trainer._compute_loss(trainer.model, inputs)
    assert expected.abs() > 1e-3
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-4, atol=1e-6)
    (g_ours,) = torch.autograd.grad(loss, trainer.model.lm_head.weight)
    (g_expected,) = torch.autograd.grad(expected, trainer.model.lm_head.weight)
    torch.testing.assert_close(g_ours, g_expected, rtol=0.0, atol=1e-4 * g_expected.abs().max().item())


def test_undeclared_scale_is_refused_under_bf16(tiny_granite_path, tiny_tokenizer, tmp_path, monkeypatch):
    """A scale the config does not declare (here: Granite's, hidden from the config reader), under
    bf16 autocast (GRPOConfig's default precision): the check compares the model's own logits with
    lm_head(h) with autocast off, to the rounding of their dtype, so a 2% scale cannot pass."""
    monkeypatch.setattr("kl_estimators.integrations.trl.logit_transform", lambda config: (1.0, None))
    trainer = build(KLGRPOTrainer, tiny_granite_path, tiny_tokenizer, tmp_path, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    inputs = _inputs_with_ref_hidden(trainer, seed=6)
    with pytest.raises(ValueError, match="not 1 x lm_head"):
        trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize(("cast_lm_head_to_fp32", "product_dtype"), ((False, None), (True, None), (False, "bfloat16")))
def test_unscaled_model_trains_under_bf16(tiny_lm_path, tiny_tokenizer, tmp_path, cast_lm_head_to_fp32, product_dtype):
    """The check reads the model's own forward, not accelerate's bf16 autocast wrapper of it (which
    train() installs): an unscaled model passes and trains, also with TRL's float32 output layer
    and with the fused KL's products in bfloat16."""
    trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, bf16=True, max_steps=1,
                    cast_lm_head_to_fp32=cast_lm_head_to_fp32, product_dtype=product_dtype)
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["kl"])


def test_bfloat16_products_are_the_kl_of_bfloat16_logits(tiny_lm_path, tiny_tokenizer, tmp_path):
    """product_dtype="bfloat16": the analytic loss is that of the logits bf16(h) bf16(W)^T (upcast, /
    T) to float32 rounding, its gradient that of autograd through them to bfloat16's resolution, and
    both differ from the float32 products' (so the products did run in bfloat16)."""
    losses = {}
    for product_dtype in (None, "bfloat16"):
        trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / str(product_dtype), temperature=0.7,
                        product_dtype=product_dtype)
        perturb(trainer.model)
        inputs = _inputs_with_ref_hidden(trainer, seed=8)
        losses[product_dtype] = loss = trainer._compute_loss(trainer.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]

    def bf16_logits(model, hidden):
        return (hidden.bfloat16() @ model.lm_head.weight.bfloat16().T).float() / trainer.temperature

    hidden = trainer.model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -T - 1 : -1]
    logits = bf16_logits(trainer.model, hidden)
    with torch.no_grad():
        ref_logits = bf16_logits(trainer.ref_model, inputs["ref_hidden_states"])
    logps = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    logps = logps.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    terms = kl.per_token_kl_loss("analytic-future-is", logps, inputs["ref_per_token_logps"], inputs["completion_mask"].bool(),
                                 logits, ref_logits, behaviour_logprobs=inputs["old_per_token_logps"])
    expected = trainer.beta * (terms * inputs["completion_mask"]).sum() / inputs["num_items_in_batch"]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-7)
    assert abs(float((losses[None] - loss).detach())) > 1e-4 * abs(float(expected.detach()))
    (g_ours,) = torch.autograd.grad(loss, trainer.model.lm_head.weight)
    (g_expected,) = torch.autograd.grad(expected, trainer.model.lm_head.weight)
    assert float((g_ours - g_expected).norm() / g_expected.norm()) < 1e-2


def test_soft_capped_model_is_refused(tiny_lm_path, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("kl_estimators.integrations.trl.logit_transform", lambda config: (1.0, 30.0))
    with pytest.raises(ValueError, match="soft-capped"):
        build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path)


# -- 4. checkpoints -------------------------------------------------------------------------------------

def test_checkpoint_records_the_estimator_and_refuses_another(tiny_lm_path, tiny_tokenizer, tmp_path):
    options = dict(save_strategy="steps", save_steps=1, max_steps=1)
    first = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="k3-loss", **options)
    first.train()
    checkpoint = tmp_path / "grpo" / "checkpoint-1"
    assert json.loads((checkpoint / ESTIMATOR_FILE).read_text()) == {"kl_estimator": "k3-loss", "weight_clip": None}
    other = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="reinforce-future-is",
                  **dict(options, max_steps=2))
    with pytest.raises(ValueError, match="trained with .*k3-loss"):
        other.train(resume_from_checkpoint=str(checkpoint))
    same = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="k3-loss", **dict(options, max_steps=2))
    same.train(resume_from_checkpoint=str(checkpoint))
    assert same.state.global_step == 2


# -- 5. PEFT / LoRA -------------------------------------------------------------------------------------

def _lora(**overrides):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, **overrides})


def _perturb_lora(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name and ".ref." not in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("estimator", tuple(kl.ESTIMATOR_INFO))
def test_lora_loss_and_gradients_match_full_logits(tiny_lm_path, tiny_tokenizer, tmp_path, estimator):
    """LoRA, every estimator: the reference is the same model with its adapters disabled (TRL's).
    On a batch TRL itself generates and scores (``_generate_and_score_completions``: the reference's
    hidden states come from its own forward), with zero advantages, the loss and the LoRA gradients
    equal beta x dapo(per_token_kl_loss) from the full logits of the model with and without adapters."""
    pytest.importorskip("peft")
    trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator=estimator, peft_config=_lora(),
                    num_iterations=2)
    assert trainer.ref_model is None
    _perturb_lora(trainer.model)
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in ("this movie was", "the plot") * 2])
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.2  # a stale batch: mu != pi
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    tokens = inputs["completion_ids"].unsqueeze(-1)
    logps = logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
    ref_logps = ref_logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
    mask = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["ref_per_token_logps"] * mask, ref_logps * mask, rtol=0, atol=1e-5)
    terms = kl.per_token_kl_loss(estimator, logps, ref_logps, mask, logits, ref_logits,
                                 behaviour_logprobs=inputs["old_per_token_logps"])
    expected = trainer.beta * (terms * mask).sum() / (inputs["num_items_in_batch"] / trainer.args.steps_per_generation)
    loss = trainer._compute_loss(model, inputs)
    assert expected.abs() > 1e-4
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-4, atol=1e-7)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    ours = torch.autograd.grad(loss, lora)
    theirs = torch.autograd.grad(expected, lora)
    scale = max(g.abs().max().item() for g in theirs)
    assert scale > 0
    for g_ours, g_theirs in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=0.0, atol=1e-4 * scale)


def test_pretrained_adapter_reference_is_its_ref_copy(tiny_lm_path, tiny_tokenizer, tmp_path):
    """A PEFT model with a trained adapter: TRL copies it as a frozen "ref" adapter and scores the
    reference with it; the analytic loss and gradients equal those from full logits with "ref" active."""
    pytest.importorskip("peft")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_path), _lora())
    _perturb_lora(model, seed=1)  # the pretrained adapter
    trainer = build(KLGRPOTrainer, model, tiny_tokenizer, tmp_path)
    assert "ref" in trainer.model.peft_config
    _perturb_lora(trainer.model, seed=2)  # the policy moves away from its reference copy
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in ("this movie was", "the plot") * 2])
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    model = trainer.model
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    model.set_adapter("ref")
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float() / trainer.temperature
    model.set_adapter("default")
    tokens = inputs["completion_ids"].unsqueeze(-1)
    logps = logits.log_softmax(-1).gather(-1, tokens).squeeze(-1)
    mask = inputs["completion_mask"].bool()
    terms = kl.per_token_kl_loss("analytic-future-is", logps, inputs["ref_per_token_logps"], mask, logits, ref_logits)
    expected = trainer.beta * (terms * mask).sum() / inputs["num_items_in_batch"]
    loss = trainer._compute_loss(model, inputs)
    assert expected.abs() > 1e-4
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-4, atol=1e-7)
    lora = [p for name, p in model.named_parameters() if "lora_" in name and ".default." in name]
    scale = max(g.abs().max().item() for g in torch.autograd.grad(expected, lora, retain_graph=True))
    for g_ours, g_theirs in zip(torch.autograd.grad(loss, lora), torch.autograd.grad(expected, lora)):
        torch.testing.assert_close(g_ours, g_theirs, rtol=0.0, atol=1e-4 * scale)


def test_lora_analytic_run_trains(tiny_lm_path, tiny_tokenizer, tmp_path):
    """A LoRA GRPO run with the default estimator (analytic-future-is) trains: finite, changed
    adapters, the base weights untouched, and ``kl`` logged at every step."""
    pytest.importorskip("peft")
    trainer = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, peft_config=_lora(), max_steps=3,
                    learning_rate=0.05, num_iterations=2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    logged = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(logged) == 3 and all(math.isfinite(x) and x >= 0 for x in logged)


def test_lora_on_the_output_layer_is_refused(tiny_lm_path, tiny_tokenizer, tmp_path):
    """TRL refuses lm_head in target_modules itself; modules_to_save=["lm_head"] gives the policy its
    own output layer, which the analytic estimators refuse at construction, in one line."""
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="output layer carries a PEFT adapter"):
        build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, peft_config=_lora(modules_to_save=["lm_head"]))
