"""Masked PPOKL and NLPO: the masked policy is sampled, stored and trained as sb3-contrib's
MaskablePPO would, NLPO's masking policy syncs on schedule, and a resumed NLPO run is exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from stable_baselines3.common.callbacks import BaseCallback

from agents import PPOKL
from agents.ppo_kl import main
from lmgym.decoding import forward_last
from lmgym.masks import top_k_top_p_mask
from tests.helpers.ppokl import make_env, make_model
from tests.helpers.cli import tiny_run_flags


def next_token_logits_along(lm, buffer) -> torch.Tensor:
    """[N, T, V] logits of ``lm`` at every stored state, from one plain full forward."""
    input_ids = torch.cat([buffer.prompt_ids, buffer.actions], dim=1)
    attention_mask = torch.cat([buffer.prompt_mask, buffer.mask.long()], dim=1)
    with torch.no_grad():
        return forward_last(lm, input_ids, attention_mask, buffer.actions.shape[1] + 1).logits[:, :-1].float()


def maskable_ppo_losses(logits, masks, batch, clip_range):
    """MaskablePPO's policy and entropy losses (sb3_contrib.ppo_mask.MaskablePPO.train) over the
    batch's generated tokens, flattened into transitions, with sb3-contrib's own distribution."""
    on = batch.mask
    dist = MaskableCategoricalDistribution(logits.shape[-1]).proba_distribution(action_logits=logits[on])
    dist.apply_masking(masks[on])
    log_prob, entropy = dist.log_prob(batch.actions[on]), dist.entropy()
    ratio = torch.exp(log_prob - batch.old_logprobs[on])
    advantages = batch.advantages[on]
    policy_loss = -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
    return policy_loss, -entropy.mean()


class CheckedPPOKL(PPOKL):
    """Runs ``check(self)`` before and ``after(self)`` after each PPO update."""

    check = staticmethod(lambda model: None)
    after = staticmethod(lambda model: None)

    def train(self) -> None:
        self.check(self)
        super().train()
        self.after(self)


def make_checked(model_path, env, check, after, **kwargs) -> CheckedPPOKL:
    kwargs.setdefault("learning_rate", 1e-2)
    kwargs.setdefault("n_epochs", 2)
    kwargs.setdefault("batch_size", 10)
    kwargs.setdefault("seed", 0)
    model = CheckedPPOKL("CausalLMPolicy", env, policy_kwargs={"model": model_path}, **kwargs)
    model.check, model.after = check, after
    return model


def test_env_masked_ppokl_agrees_with_maskable_ppo(tiny_lm_path):
    """An lmgym env with the reference's top-3 as action masks: the stored masks are the env's
    (recomputed independently), actions lie in them, the stored log-probs are MaskableCategorical's
    and, after an update moved the policy (ratios != 1), PPOKL's policy and entropy losses equal
    MaskablePPO's formulas on sb3-contrib's distribution (tolerance: float32 rounding, 1e-5)."""
    env = make_env(tiny_lm_path, n_envs=4, mask_top_k=3)
    seen = {}

    def check(model):
        buffer = model.rollout_buffer
        on = buffer.mask
        ref = next_token_logits_along(env.venv.task.ref_model, buffer)
        assert torch.equal(buffer.action_masks[on], top_k_top_p_mask(ref, 3)[on])
        assert buffer.action_masks[on].gather(-1, buffer.actions[on].unsqueeze(-1)).all()
        logits = next_token_logits_along(model.policy.lm, buffer)
        dist = MaskableCategoricalDistribution(logits.shape[-1]).proba_distribution(action_logits=logits[on])
        dist.apply_masking(buffer.action_masks[on])
        torch.testing.assert_close(buffer.logprobs[on], dist.log_prob(buffer.actions[on]), atol=1e-5, rtol=1e-5)
        seen["checked"] = True

    def after(model):
        batch = next(model.rollout_buffer.get(4, torch.Generator().manual_seed(0)))
        with torch.no_grad():
            losses = model.ppo_losses(batch, 0.2, None)
            logits, _ = model.policy.sequence_forward(batch.input_ids, batch.attention_mask, batch.actions.shape[1])
        policy_loss, entropy_loss = maskable_ppo_losses(logits, batch.action_masks, batch, 0.2)
        assert not torch.allclose(losses["approx_kl"], torch.zeros(())), "the update moved the policy"
        torch.testing.assert_close(losses["policy_gradient_loss"], policy_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses["entropy_loss"], entropy_loss, atol=1e-5, rtol=1e-5)
        seen["after"] = True

    model = make_checked(tiny_lm_path, env, check, after, kl_reward="analytic", analytic_grad=True, kl_coef=0.1)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    assert seen == {"checked": True, "after": True}
    assert 0 < model.rollout_stats["rollout/mask_tokens"] <= 3


def test_masked_analytic_kl_is_over_the_allowed_tokens(tiny_lm_path):
    """The rollout's analytic KL is KL(pi^M || pi_ref) = sum_{a in M} pi^M(a) log(pi^M(a) / pi_ref(a)),
    computed here by hand from the masked, renormalised probabilities."""
    env = make_env(tiny_lm_path, n_envs=3, mask_top_p=0.5)

    def check(model):
        buffer = model.rollout_buffer
        on = buffer.mask
        logits = next_token_logits_along(model.policy.lm, buffer)[on].double()
        ref = next_token_logits_along(env.venv.task.ref_model, buffer)[on].double()
        allowed = buffer.action_masks[on]
        p = torch.where(allowed, logits.softmax(-1), 0.0)
        p = p / p.sum(-1, keepdim=True)
        terms = torch.where(allowed, p * (p.log() - ref.log_softmax(-1)), 0.0)
        torch.testing.assert_close(buffer.analytic_kl[on].double(), terms.sum(-1), atol=1e-5, rtol=1e-4)

    model = make_checked(tiny_lm_path, env, check, lambda m: None, kl_reward="analytic", analytic_grad=True)
    model.learn(total_timesteps=model.n_envs * model.n_steps)


class SyncRecorder(BaseCallback):
    """At each rollout's end: whether the masking policy equals the policy's LM."""

    def __init__(self):
        super().__init__()
        self.equal: list[bool] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        pairs = zip(self.model.masking_lm.state_dict().values(), self.model.policy.lm.state_dict().values())
        self.equal.append(all(torch.equal(a, b) for a, b in pairs))


def test_nlpo_masks_come_from_the_masking_policy_synced_on_schedule(tiny_lm_path):
    """mask_sync_every=2: the masking policy is the policy at iterations 0 and 2 (synced) and a stale
    copy at 1 and 3; the stored masks are its top-p (recomputed by a full forward)."""
    env = make_env(tiny_lm_path, n_envs=3)

    def check(model):
        buffer = model.rollout_buffer
        masking = next_token_logits_along(model.masking_lm, buffer)
        assert torch.equal(buffer.action_masks[buffer.mask], top_k_top_p_mask(masking, None, 0.6)[buffer.mask])

    model = make_checked(tiny_lm_path, env, check, lambda m: None, mask_top_p=0.6, mask_sync_every=2, kl_reward="k1")
    recorder = SyncRecorder()
    model.learn(total_timesteps=4 * model.n_envs * model.n_steps, callback=recorder)
    assert recorder.equal == [True, False, True, False]
    assert not any(p.requires_grad for p in model.masking_lm.parameters())


def test_nlpo_resume_is_exact(tiny_lm_path, tmp_path):
    """Save after one iteration, train two more (one sync at iteration 2); load and train the same
    two: bit-identical policy, masking policy and optimizer state."""
    model = make_model(tiny_lm_path, mask_top_p=0.7, mask_sync_every=2, kl_reward="analytic", analytic_grad=True)
    steps = model.n_envs * model.n_steps
    model.learn(total_timesteps=steps)
    model.save(tmp_path / "model.safetensors")
    model.learn(total_timesteps=2 * steps, reset_num_timesteps=False)

    torch.manual_seed(123)
    loaded = PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path))
    assert loaded.masking_lm is not None and (loaded.mask_top_p, loaded.mask_sync_every) == (0.7, 2)
    loaded.learn(total_timesteps=2 * steps, reset_num_timesteps=False)
    for module in ("policy", "masking_lm"):
        for (name, a), b in zip(getattr(model, module).state_dict().items(), getattr(loaded, module).state_dict().values()):
            assert torch.equal(a, b), f"{module}.{name}"
    expected, got = model.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    for index, state in expected.items():
        assert all(torch.equal(state[key], got[index][key]) for key in state if torch.is_tensor(state[key])), index


def test_nlpo_options_are_checked(tiny_lm_path, capsys):
    with pytest.raises(ValueError, match="top_p"):
        make_model(tiny_lm_path, mask_top_p=1.5)
    with pytest.raises(ValueError, match="mask_sync_every"):
        make_model(tiny_lm_path, mask_top_p=0.9, mask_sync_every=0)
    with pytest.raises(ValueError, match="own action masks"):
        make_model(tiny_lm_path, env=make_env(tiny_lm_path, mask_top_k=2), mask_top_p=0.9)
    for masked in ({"mask_top_p": 0.9}, {"env": make_env(tiny_lm_path, mask_top_k=2)}):  # the fused KL has no vocabulary mask
        with pytest.raises(ValueError, match="'hidden' does not support action masks"):
            make_model(tiny_lm_path, ref_logits="hidden", kl_reward="analytic", analytic_grad=True, **masked)
    with pytest.raises(SystemExit) as exit_info:
        main(["--mask-top-p", "0"])
    assert exit_info.value.code == 2 and "--mask-top-p" in capsys.readouterr().err


def test_cli_trains_nlpo_and_resumes(tiny_lm_path, tmp_path):
    out = tmp_path / "run"
    flags = tiny_run_flags(tiny_lm_path, out, 1) + ["--mask-top-p", "0.9", "--mask-sync-every", "1", "--eval-every", "0"]
    assert main(flags) == 0
    assert main(tiny_run_flags(tiny_lm_path, out, 2) + ["--resume", "--eval-every", "0"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert "rollout/mask_tokens" in rows[0] and len(rows) == 3
    assert np.isfinite([float(x) for x in rows[-1].split(",")[1:] if x]).all()
