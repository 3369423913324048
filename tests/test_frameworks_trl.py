"""TRL 1.16.0's GRPO KL term against ``kl_estimators``, calling ``GRPOTrainer._compute_loss`` itself.

Map tests: the trainer's forward is replaced by a leaf tensor of random log-probs (float64), the
advantages are 0 (so TRL's policy term is 0 in value and gradient), and TRL's loss must equal
beta x aggregate(our per-token term) in value and in gradient with respect to the log-probs.
Drop-in tests: ``KLGRPOTrainer`` with "k3-loss" / "k3-ratio" against ``GRPOTrainer`` on the tiny
model, same inputs, real forward: equal loss and parameter gradients.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

import kl_estimators as kl  # noqa: E402
from kl_estimators.integrations.trl import KLGRPOTrainer  # noqa: E402
from tests.helpers.trl_setup import batch, build, perturb  # noqa: E402

LOSS_TYPES = ("dapo", "grpo", "sapo", "bnpo", "dr_grpo", "luspo", "cispo", "vespo")


@pytest.fixture(scope="module")
def grpo(tiny_lm_path, tiny_tokenizer, tmp_path_factory):
    return build(GRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path_factory.mktemp("trl"))


def _random_inputs(seed: int, B: int = 5, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logps = (-2 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": torch.zeros(B, dtype=torch.float64),
        "old_per_token_logps": logps.detach() + 0.5 * (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5),
        "ref_per_token_logps": -2 * torch.rand(B, T, generator=g, dtype=torch.float64),
        "num_items_in_batch": mask.sum() * 3,  # the generation batch spans more than this micro-batch
    }
    return logps, inputs


def _trl_kl_loss(trainer, logps, inputs, **settings):
    """TRL's own ``_compute_loss`` with the forward replaced by ``logps`` and zero advantages."""
    saved = {name: getattr(trainer, name) for name in ("loss_type", "importance_sampling_level", "beta")}
    saved_bias = trainer.args.use_bias_correction_kl
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    try:
        for name, value in settings.items():
            if name == "use_bias_correction_kl":
                trainer.args.use_bias_correction_kl = value
            else:
                setattr(trainer, name, value)
        return GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
        for name, value in saved.items():
            setattr(trainer, name, value)
        trainer.args.use_bias_correction_kl = saved_bias


def _aggregate(terms, mask, loss_type, inputs, max_completion_length, steps_per_generation):
    """TRL 1.16's normalisers, written out: the denominator each loss_type divides the token sum by."""
    mask = mask.to(terms.dtype)
    per_sequence = (terms * mask).sum(-1)
    if loss_type in ("grpo", "sapo"):
        return (per_sequence / mask.sum(-1)).mean()
    if loss_type == "bnpo":
        return per_sequence.sum() / mask.sum()
    if loss_type == "dr_grpo":
        return per_sequence.sum() / (terms.size(0) * max_completion_length)
    if loss_type == "luspo":
        return per_sequence.mean()
    return per_sequence.sum() / (inputs["num_items_in_batch"] / steps_per_generation)  # dapo, cispo, vespo


def _check(trainer, logps, inputs, ours, loss_type, **settings):
    trl_loss = _trl_kl_loss(trainer, logps, inputs, loss_type=loss_type, **settings)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    expected = trainer.beta * _aggregate(ours, inputs["completion_mask"], loss_type, inputs,
                                         trainer.max_completion_length, trainer.args.steps_per_generation)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(trl_loss.double(), expected.double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(trl_grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ("token", "sequence"))
def test_trl_k3_loss(grpo, loss_type, level):
    """beta > 0, use_bias_correction_kl=False: k3 differentiated directly (k3-loss), at both levels."""
    logps, inputs = _random_inputs(seed=1)
    mask = inputs["completion_mask"].bool()
    ours = kl.per_token_kl_loss("k3-loss", logps, inputs["ref_per_token_logps"], mask)
    _check(grpo, logps, inputs, ours, loss_type, importance_sampling_level=level, use_bias_correction_kl=False)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trl_bias_correction_token(grpo, loss_type):
    """use_bias_correction_kl=True (the 1.16 default), token level: k3 x coef_1, coef_1 = pi/pi_old
    differentiable and unclamped = k3-ratio with behaviour = old_per_token_logps."""
    logps, inputs = _random_inputs(seed=2)
    mask = inputs["completion_mask"].bool()
    ours = kl.per_token_kl_loss("k3-ratio", logps, inputs["ref_per_token_logps"], mask,
                                behaviour_logprobs=inputs["old_per_token_logps"])
    _check(grpo, logps, inputs, ours, loss_type, importance_sampling_level="token", use_bias_correction_kl=True)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trl_bias_correction_sequence(grpo, loss_type):
    """Sequence level: k3_t x exp(mean_t log rho_t), the GSPO weight, differentiable: no estimator of
    this library (not the sequence ratio W_T = exp(sum_t log rho_t))."""
    logps, inputs = _random_inputs(seed=3)
    mask = inputs["completion_mask"].bool()
    log_rho = torch.where(mask, logps - inputs["old_per_token_logps"], 0.0)
    gspo_weight = torch.exp(log_rho.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
    ours = gspo_weight * kl.per_token_kl_loss("k3-loss", logps, inputs["ref_per_token_logps"], mask)
    _check(grpo, logps, inputs, ours, loss_type, importance_sampling_level="sequence", use_bias_correction_kl=True)


def test_trl_defaults(grpo):
    """The map's 'default' row: trl 1.16 GRPOConfig defaults (checked on a fresh config)."""
    from trl import GRPOConfig

    config = GRPOConfig(output_dir="unused", use_cpu=True)
    assert (config.beta, config.loss_type, config.importance_sampling_level, config.use_bias_correction_kl, config.num_iterations) == (
        0.0, "dapo", "token", True, 1)


# -- the drop-in ---------------------------------------------------------------------------------------


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return loss.detach(), grads


@pytest.mark.parametrize(("estimator", "bias_correction"), (("k3-loss", False), ("k3-ratio", True)))
@pytest.mark.parametrize(("loss_type", "accumulation"), [(loss_type, 1) for loss_type in LOSS_TYPES] + [("dapo", 2), ("grpo", 2)])
def test_drop_in_reproduces_trl(tiny_lm_path, tiny_tokenizer, tmp_path, estimator, bias_correction, loss_type, accumulation):
    """(a) KLGRPOTrainer("k3-loss") = GRPOTrainer(use_bias_correction_kl=False) and ("k3-ratio") =
    GRPOTrainer(use_bias_correction_kl=True): same loss and parameter gradients on the tiny model
    (also with 2 gradient-accumulation steps, which enter TRL's normalisers)
    (TRL's fused head computes in float32: the two sum the same terms in different orders, measured
    differences ~1e-6 of the largest gradient entry; tolerance 2e-5 of it), off-policy inputs (old != current), every loss_type."""
    settings = dict(loss_type=loss_type, use_bias_correction_kl=bias_correction, gradient_accumulation_steps=accumulation)
    theirs = build(GRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "trl", **settings)
    ours = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "ours", kl_estimator=estimator, **settings)
    perturb(theirs.model)
    perturb(ours.model)
    inputs = batch(theirs.model, theirs.ref_model, torch.Generator().manual_seed(0))
    loss_theirs, grads_theirs = _loss_and_grads(theirs, inputs)
    loss_ours, grads_ours = _loss_and_grads(ours, inputs)
    assert loss_theirs.abs() > 0
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=2e-6, atol=0.0)
    assert len(grads_ours) == len(grads_theirs) > 0
    for g_ours, g_theirs in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=0.0, atol=2e-5 * g_theirs.abs().max().item())


def test_locked_trl_version():
    """The installed TRL is the version the map describes (a lock to another version fails here)."""
    import trl

    from kl_estimators.frameworks import FRAMEWORK_VERSIONS

    assert trl.__version__ == FRAMEWORK_VERSIONS["trl"]


@pytest.mark.parametrize("estimator", ("analytic-future-is", "reinforce-future-is", "k3+is"))
def test_drop_in_term_is_the_estimator(tiny_lm_path, tiny_tokenizer, tmp_path, estimator):
    """With zero advantages (TRL's policy term 0 in value and gradient), KLGRPOTrainer's loss =
    beta x dapo-aggregate(per_token_kl_loss(estimator)) in value and gradient, with logits (for
    analytic-*) computed here by a plain forward of each model: the hidden states the trainer keeps
    from TRL's forwards give the same logits (float32: tolerance 1e-4)."""
    ours = build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "ours", kl_estimator=estimator)
    perturb(ours.model)
    inputs = batch(ours.model, ours.ref_model, torch.Generator().manual_seed(1))
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        inputs["ref_hidden_states"] = ours.ref_model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -T - 1 : -1]
        ref_logits = ours.ref_model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float()
    logits = ours.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float()
    logps = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].bool()
    terms = kl.per_token_kl_loss(estimator, logps, inputs["ref_per_token_logps"], mask, logits, ref_logits,
                                 behaviour_logprobs=inputs["old_per_token_logps"])
    expected = ours.beta * (terms * mask).sum() / inputs["num_items_in_batch"]
    loss_ours = ours._compute_loss(ours.model, inputs)
    assert expected.abs() > 1e-3
    torch.testing.assert_close(loss_ours, expected.to(loss_ours.dtype), rtol=1e-4, atol=1e-6)
    (g_ours,) = torch.autograd.grad(loss_ours, ours.model.lm_head.weight)
    (g_expected,) = torch.autograd.grad(expected, ours.model.lm_head.weight)
    torch.testing.assert_close(g_ours, g_expected, rtol=0.0, atol=1e-4 * g_expected.abs().max().item())


@pytest.mark.parametrize(("kwargs", "message"), (
    (dict(kl_estimator="k9"), "kl_estimator must be one of"),
    (dict(kl_estimator="reinforce-future-is", beta=0.0), "beta > 0"),
    (dict(kl_estimator="analytic-future-is", loss_type="grpo"), "biases kl_estimator"),
    (dict(kl_estimator="reinforce-future-is", loss_type="bnpo"), "biases kl_estimator"),
))
def test_drop_in_refuses(tiny_lm_path, tiny_tokenizer, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, **kwargs)


def test_drop_in_allows_biased_estimators_with_any_loss_type(tiny_lm_path, tiny_tokenizer, tmp_path):
    """k3-loss under loss_type='grpo' is TRL's own behaviour (reproduced above): allowed."""
    assert build(KLGRPOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="k3-loss", loss_type="grpo").loss_type == "grpo"


def test_trl_rloo_kl_lines():
    """RLOOTrainer(beta > 0): reward -= beta x sum_t (old_logp - ref_logp), the sequence k1 of the
    rollout policy, then a clipped sequence ratio in the loss: reinforce on-policy; stale (log mu
    - log pi_ref) off-policy, whose bias tests/test_kl_expectations.py::test_stale_sequence_k1_reward_with_sequence_ratio proves."""
    import inspect

    from trl import RLOOTrainer

    source = inspect.getsource(RLOOTrainer._generate_and_score_completions)
    assert "per_token_kl = old_per_token_logps - ref_per_token_logps" in source
    assert "kl = (per_token_kl * completion_mask).sum(-1)" in source
    assert "rewards = rewards - self.beta * kl" in source
    loss_source = inspect.getsource(RLOOTrainer._compute_loss)
    assert "log_ratio = logps - old_logps" in loss_source and "coef_1 = torch.exp(log_ratio)" in loss_source


def test_trl_gmpo_kl(grpo):
    """Experimental GMPOTrainer (beta > 0): k3 averaged over each sequence's tokens, then over the
    batch (k3-loss with 1/length weights); use_bias_correction_kl is ignored."""
    from trl.experimental.gmpo import GMPOTrainer

    logps, inputs = _random_inputs(seed=6)
    grpo._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    try:
        theirs = GMPOTrainer._compute_loss(grpo, grpo.model, inputs)
    finally:
        del grpo._get_per_token_logps_and_entropies
    assert grpo.args.use_bias_correction_kl
    mask = inputs["completion_mask"].bool()
    ours = grpo.beta * _aggregate(kl.per_token_kl_loss("k3-loss", logps, inputs["ref_per_token_logps"], mask),
                                  inputs["completion_mask"], "grpo", inputs, None, None)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    (g_ours,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_theirs, g_ours, rtol=1e-10, atol=1e-12)


def test_trl_has_no_ppo_trainer():
    """trl 1.16.0 from the package index has no PPO trainer (neither trl/trainer/ppo_trainer.py nor
    trl/experimental/ppo) and no kl_estimator option: k1/k3-in-the-reward PPO is not available in TRL."""
    import dataclasses
    import importlib.util

    import trl
    from trl import GRPOConfig

    assert importlib.util.find_spec("trl.experimental.ppo") is None
    assert importlib.util.find_spec("trl.trainer.ppo_trainer") is None
    assert not hasattr(trl, "PPOTrainer")
    assert "kl_estimator" not in {field.name for field in dataclasses.fields(GRPOConfig)}


def test_trl_fused_lm_head_projects_every_position_off_triton(tiny_lm_path, monkeypatch):
    """TRL 1.16's fused LM head (GRPOTrainer's log-probs, ``add_fused_lm_head``) projects only the
    labelled positions on Triton devices, but every position elsewhere: on CPU its output layer runs
    over all L - 1 positions of prompt + completion, where PPOKL runs it on the completion's
    (``docs/fused-kl.md`` counts TRL's matrix work so)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    utils.add_fused_lm_head(model)
    projected: list[int] = []
    original = utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", lambda hidden, *rest: (projected.append(hidden.shape[0]), original(hidden, *rest))[1])
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :-3] = -100  # a 4-token prompt and a 3-token completion per row
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    assert int(out.label_mask.sum()) == 2 * 3
    assert projected == [2 * 6]
