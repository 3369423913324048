"""``KLRLOOTrainer`` (kl_estimators.integrations.trl_rloo) against TRL 1.16.0's ``RLOOTrainer`` and
against full-logit computations, on the tiny Llama of tests/conftest.py (CPU, float32)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("trl")
from trl import RLOOTrainer  # noqa: E402

import kl_estimators as kl  # noqa: E402
from kl_estimators.integrations.trl_rloo import KLRLOOTrainer  # noqa: E402
from tests.helpers.trl_setup import build_rloo as _build, perturb, rloo_reward as _reward  # noqa: E402

BETA, G = 0.1, 4


def _generate(trainer, prompts=("this movie was",), seed=0):
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(G)])


def _grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def _full_logits(model, inputs):
    """[B, T, V] float32 logits of ``model`` at the completion positions, and the completion mask."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    return model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1].float()


def _loo(rewards):
    grouped = rewards.view(-1, G)
    return (rewards - ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1))


def test_reinforce_reproduces_trl(tiny_lm_path, tiny_tokenizer, tmp_path):
    """kl_estimator="reinforce" is TRL's RLOO (k1 of the rollout policy in the sequence reward): the same
    completions, advantages, loss and gradients, and after two training steps the same parameters."""
    theirs = _build(RLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "a")
    ours = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "b", kl_estimator="reinforce")
    a, b = _generate(theirs), _generate(ours)
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    torch.testing.assert_close(a["advantages"], b["advantages"], rtol=0, atol=0)
    assert a["advantages"].abs().sum() > 0
    (la, ga), (lb, gb) = _grads(theirs, a), _grads(ours, b)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    theirs = _build(RLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "c", max_steps=2)
    theirs.train()  # built then trained, each: the Trainer seeds the global RNG when it is built
    ours = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path / "d", max_steps=2, kl_estimator="reinforce")
    ours.train()
    for x, y in zip(theirs.model.parameters(), ours.model.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_analytic_future_reward_is_the_exact_kl(tiny_lm_path, tiny_tokenizer, tmp_path):
    """kl_estimator="analytic-future": the sequence reward is r - beta x sum_t KL(pi_old(.|s_t) || pi_ref(.|s_t))
    from the full logits (leave-one-out advantages equal), TRL's ``kl`` metric is the per-token mean of
    KL_t, and the loss is RLOO's policy loss + beta x mean_i sum_t KL_t (current forward), value and gradients."""
    trainer = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="analytic-future")
    out = _generate(trainer)
    mask = out["completion_mask"].bool()
    with torch.no_grad():
        exact = kl.analytic(_full_logits(trainer.model, out), _full_logits(trainer.ref_model, out), mask=mask)
    rewards = torch.tensor(_reward([ids[m].tolist() for ids, m in zip(out["completion_ids"], mask)]))
    expected = _loo(rewards - BETA * exact.sum(-1))
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx((exact.sum() / mask.sum()).item(), rel=1e-5)

    loss, grads = _grads(trainer, out)
    trainer.model.zero_grad()
    logits, ref_logits = _full_logits(trainer.model, out), _full_logits(trainer.ref_model, out).detach()
    reference = RLOOTrainer._compute_loss(trainer, trainer.model, out) + BETA * kl.analytic(
        logits, ref_logits, mask=mask).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for x, p in zip(grads, (p for p in trainer.model.parameters() if p.grad is not None)):
        torch.testing.assert_close(x, p.grad, rtol=1e-4, atol=1e-6)


def test_bfloat16_products_reach_the_reward(tiny_lm_path, tiny_tokenizer, tmp_path):
    """product_dtype="bfloat16": the reward's KL_t is the exact KL of the logits bf16(h) bf16(W)^T
    (upcast), not of the float32 logits."""
    trainer = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="analytic-future",
                     product_dtype="bfloat16")
    out = _generate(trainer)
    mask = out["completion_mask"].bool()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    T = out["completion_ids"].shape[1]

    def bf16_logits(model):
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -T - 1 : -1]
        return (hidden.bfloat16() @ model.lm_head.weight.bfloat16().T).float()

    with torch.no_grad():
        exact = kl.analytic(bf16_logits(trainer.model), bf16_logits(trainer.ref_model), mask=mask)
        float32 = kl.analytic(_full_logits(trainer.model, out), _full_logits(trainer.ref_model, out), mask=mask)
    assert float((exact - float32).abs().max()) > 1e-4  # the two products differ here
    rewards = torch.tensor(_reward([ids[m].tolist() for ids, m in zip(out["completion_ids"], mask)]))
    torch.testing.assert_close(out["advantages"], _loo(rewards - BETA * exact.sum(-1)), rtol=1e-5, atol=1e-6)


def test_loss_placed_estimator_with_importance_weights(tiny_lm_path, tiny_tokenizer, tmp_path):
    """kl_estimator="analytic-future-is" with num_iterations=2: no KL in the reward (advantages of the task
    reward alone) and beta x the sequence sum of per_token_kl_loss on the full logits, behaviour = the
    rollout policy, in the loss; evaluated after a step so that pi != mu."""
    trainer = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="analytic-future-is",
                     num_iterations=2)
    out = _generate(trainer)
    mask = out["completion_mask"].bool()
    rewards = torch.tensor(_reward([ids[m].tolist() for ids, m in zip(out["completion_ids"], mask)]))
    torch.testing.assert_close(out["advantages"], _loo(rewards), rtol=1e-6, atol=1e-7)
    k1 = ((out["old_per_token_logps"] - out["ref_per_token_logps"]) * mask).sum() / mask.sum()
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(k1.item(), rel=1e-5)  # TRL's kl metric, not 0
    perturb(trainer.model, scale=0.05, seed=1)  # pi moves away from the rollout policy mu
    loss, grads = _grads(trainer, out)
    trainer.model.zero_grad()
    logits = _full_logits(trainer.model, out)
    ref_logits = _full_logits(trainer.ref_model, out).detach()
    logps = logits.log_softmax(-1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ref = ref_logits.log_softmax(-1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    terms = kl.per_token_kl_loss("analytic-future-is", logps, ref, mask, logits, ref_logits,
                                 behaviour_logprobs=out["old_per_token_logps"])
    reference = RLOOTrainer._compute_loss(trainer, trainer.model, out) + BETA * (terms * mask).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for x, p in zip(grads, (p for p in trainer.model.parameters() if p.grad is not None)):
        torch.testing.assert_close(x, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), (
    (dict(kl_estimator="nope"), "kl_estimator must be one of"),
    (dict(kl_estimator="analytic-future", num_iterations=2), "use 'analytic-future-is'"),
    (dict(kl_estimator="analytic-future", steps_per_generation=2), "use 'analytic-future-is'"),
    (dict(kl_estimator="analytic-future", normalize_advantages=True), "normalize_advantages=False"),
    (dict(beta=0.0), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(weight_clip=0.0), "weight_clip"),
    (dict(product_dtype="int8"), "product_dtype must be None or one of"),
    (dict(kl_estimator="reinforce", product_dtype="bfloat16"), "uses no logits"),
))
def test_refused_configurations(tiny_lm_path, tiny_tokenizer, tmp_path, overrides, message, monkeypatch):
    """Each refused before any model loads (a load would fail here)."""
    monkeypatch.setattr(RLOOTrainer, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, **overrides)


def test_tabular_expected_gradient_of_the_placement():
    """Exact enumeration (float64, V = 3 tokens, T = 2, G = 2 samples per prompt): RLOO's expected
    gradient with the reward part -beta x sum_t KL_t in the sequence reward (leave-one-out baseline)
    plus the direct part beta x sum_t KL_t in the loss is beta x grad KL(pi || pi_ref) of the
    sequence distribution; the reward part alone is not (it misses the direct part)."""
    V = 3
    g = torch.Generator().manual_seed(0)
    theta1 = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    theta2 = torch.randn(V, V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref1, ref2 = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)

    def step_kl(logits, ref_logits):
        return (logits.softmax(-1) * (logits.log_softmax(-1) - ref_logits.log_softmax(-1))).sum(-1)

    def seq(y):
        """log pi(y) and sum_t KL_t along y (both differentiable)."""
        logp = theta1.log_softmax(-1)[y[0]] + theta2[y[0]].log_softmax(-1)[y[1]]
        return logp, step_kl(theta1, ref1) + step_kl(theta2[y[0]], ref2[y[0]])

    sequences = list(itertools.product(range(V), repeat=2))
    with torch.no_grad():
        prob = {y: seq(y)[0].exp().item() for y in sequences}
    full = reward_only = 0.0
    for a, b in itertools.product(sequences, repeat=2):
        (la, ka), (lb, kb) = seq(a), seq(b)
        rewards = -BETA * torch.stack([ka, kb]).detach()
        advantages = rewards - rewards.flip(0)  # leave-one-out with G = 2
        policy = -(advantages * torch.stack([la - la.detach(), lb - lb.detach()]).exp()).mean()
        direct = BETA * torch.stack([ka, kb]).mean()
        full = full + prob[a] * prob[b] * (policy + direct)
        reward_only = reward_only + prob[a] * prob[b] * policy
    p1 = theta1.softmax(-1)
    sequence_kl = step_kl(theta1, ref1) + (p1 * step_kl(theta2, ref2)).sum()
    expected = torch.autograd.grad(BETA * sequence_kl, (theta1, theta2))
    got = torch.autograd.grad(full, (theta1, theta2), retain_graph=True)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    alone = torch.autograd.grad(reward_only, (theta1, theta2))
    assert max((x - y).abs().max().item() for x, y in zip(alone, expected)) > 1e-3


def test_peft_loss_placed_estimator(tiny_lm_path, tiny_tokenizer, tmp_path):
    """With a LoRA adapter (TRL's reference = the same model with the adapter disabled), a loss-placed
    estimator without logits ("reinforce-future-is") gets TRL's reference log-probs: the loss is RLOO's
    plus beta x the sequence sum of per_token_kl_loss on log-probs from the full logits, value and gradients."""
    from peft import LoraConfig

    trainer = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="reinforce-future-is",
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    with torch.no_grad():  # _build perturbed every weight, the base's too: move the adapter off zero as well
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.3)
    out = _generate(trainer)
    mask = out["completion_mask"].bool()
    ids = out["completion_ids"].unsqueeze(-1)
    with torch.no_grad(), trainer.model.disable_adapter():
        ref = _full_logits(trainer.model, out).log_softmax(-1).gather(-1, ids).squeeze(-1)
    torch.testing.assert_close(out["ref_per_token_logps"][mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert (out["old_per_token_logps"] - ref)[mask].abs().max() > 1e-3
    loss, grads = _grads(trainer, out)
    trainer.model.zero_grad()
    logps = _full_logits(trainer.model, out).log_softmax(-1).gather(-1, ids).squeeze(-1)
    terms = kl.per_token_kl_loss("reinforce-future-is", logps, ref, mask, behaviour_logprobs=out["old_per_token_logps"])
    reference = RLOOTrainer._compute_loss(trainer, trainer.model, out) + BETA * (terms * mask).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for x, p in zip(grads, (p for p in trainer.model.parameters() if p.grad is not None)):
        torch.testing.assert_close(x, p.grad, rtol=1e-4, atol=1e-6)


def test_peft_analytic_future(tiny_lm_path, tiny_tokenizer, tmp_path):
    """With a LoRA adapter, "analytic-future" takes the reference's hidden states from TRL's
    adapter-disabled forward and the base model's output layer: the reward's KL is the exact KL between
    the adapted and the adapter-disabled model, from the full logits."""
    from peft import LoraConfig

    trainer = _build(KLRLOOTrainer, tiny_lm_path, tiny_tokenizer, tmp_path, kl_estimator="analytic-future",
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.3)
    out = _generate(trainer)
    mask = out["completion_mask"].bool()
    with torch.no_grad():
        logits = _full_logits(trainer.model, out)
        with trainer.model.disable_adapter():
            ref_logits = _full_logits(trainer.model, out)
    exact = kl.analytic(logits, ref_logits, mask=mask)
    assert exact.sum() > 1e-3
    rewards = torch.tensor(_reward([ids[m].tolist() for ids, m in zip(out["completion_ids"], mask)]))
    torch.testing.assert_close(out["advantages"], _loo(rewards - BETA * exact.sum(-1)), rtol=1e-5, atol=1e-6)
    loss, grads = _grads(trainer, out)
    trainer.model.zero_grad()
    reference = RLOOTrainer._compute_loss(trainer, trainer.model, out) + BETA * kl.analytic(
        _full_logits(trainer.model, out), ref_logits, mask=mask).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for x, p in zip(grads, (p for p in trainer.model.parameters() if p.grad is not None)):
        torch.testing.assert_close(x, p.grad, rtol=1e-4, atol=1e-5)  # float32 sums
