"""SkyRL 0.3.0, AReaL 1.0.4 and oat 0.2.4 KL code against ``kl_estimators``: value and gradient.

None of the three installs next to the locked set (SkyRL pins peft 0.18.1, AReaL torch < 2.11, oat
DeepSpeed and Python < 3.11), so their files are read from .venv/frameworks and their functions, or
the quoted statements of the methods that hold the KL code, are executed verbatim
(``tests/helpers/framework_source.py``). Reward-side tests build the policy-gradient surrogate
``-(log pi - sg log pi) x return`` from the framework's own reward and check its gradient against
the named estimator, as ``test_frameworks_verl_openrlhf.py`` does for OpenRLHF.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kl_estimators as kl
from kl_estimators.frameworks import FRAMEWORK_VERSIONS
from tests.helpers.framework_source import installed_file, installed_version, load, run_block
from tests.helpers.framework_tensors import AGG, assert_same, random_logps

SKYRL_PPO = "skyrl/backends/skyrl_train/utils/ppo_utils.py"
SKYRL_WORKER = "skyrl/backends/skyrl_train/workers/worker.py"
AREAL_DATA = "areal/utils/data.py"
AREAL_ACTOR = "areal/trainer/ppo/actor.py"
OAT_PPO = "oat/algorithms/ppo.py"


@pytest.mark.parametrize(("framework", "dist"), (("skyrl", "skyrl"), ("areal", "areal"), ("oat", "oat_llm")))
def test_locked_versions(framework, dist):
    """The installed version is the one the map describes (a lock to another version fails here)."""
    assert installed_version(dist) == FRAMEWORK_VERSIONS[framework]


def _surrogate(logps: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """REINFORCE's per-token surrogate: its gradient is score_t x return_t (the loss is its sum)."""
    return -(logps - logps.detach()) * returns


# -- SkyRL --------------------------------------------------------------------------------------------

SKYRL_NAMES = {"k1": "k1-loss", "abs": "abs-loss", "k2": "k2-loss", "k3": "k3-loss"}


@pytest.fixture(scope="module")
def skyrl():
    return load(SKYRL_PPO, ("compute_approx_kl",))


@pytest.mark.parametrize("name", sorted(SKYRL_NAMES))
def test_skyrl_kl_loss(skyrl, name):
    """trainer.algorithm.kl_estimator_type k1 / abs / k2 / k3 (``compute_approx_kl``, the term of both
    use_kl_loss and use_kl_in_reward): the named estimator (k3 clamped as verl's low_var_kl)."""
    logps, ref, _, mask = random_logps(seed=20 + len(name))
    theirs = skyrl["compute_approx_kl"](logps, ref, loss_mask=mask, kl_estimator_type=name)
    assert_same(theirs, kl.per_token_kl_loss(SKYRL_NAMES[name], logps, ref, mask), logps, mask)
    if name == "k3":  # beyond the clamp: value 10, no gradient
        far = torch.tensor([[-15.0]], dtype=torch.float64, requires_grad=True)
        value = skyrl["compute_approx_kl"](far, torch.tensor([[-1.0]], dtype=torch.float64), kl_estimator_type="k3")
        (grad,) = torch.autograd.grad(value.sum(), far)
        assert value.item() == 10.0 and grad.item() == 0.0


def test_skyrl_kl_loss_lines(skyrl):
    """use_kl_loss (the default, with k3 and kl_loss_coef 0.001): the worker's statements run verbatim
    give the per-sequence token mean of compute_approx_kl(pi, pi_ref), then the batch mean (weights
    1/length), with no old log-probs (no importance weight at any epoch)."""
    masked_mean = load("skyrl/backends/skyrl_train/utils/torch_utils.py", ("masked_mean",))["masked_mean"]
    logps, ref, _, mask = random_logps(seed=24)
    algorithm = SimpleNamespace(use_kl_loss=True, kl_estimator_type="k3")
    scope = run_block(SKYRL_WORKER, "if self.cfg.algorithm.use_kl_loss:\nkl_loss = compute_approx_kl(", 8, {
        "self": SimpleNamespace(cfg=SimpleNamespace(algorithm=algorithm)), "action_log_probs": logps,
        "base_action_log_probs": ref, "loss_mask": mask.double(), "compute_approx_kl": skyrl["compute_approx_kl"],
        "masked_mean": masked_mean})
    ours = AGG["seq-mean-token-mean"](kl.per_token_kl_loss("k3-loss", logps, ref, mask), mask.double())
    assert_same(scope["kl_loss"].reshape(1, 1), ours.reshape(1, 1), logps, torch.ones(1, 1, dtype=torch.bool))
    config = installed_file("skyrl/train/config/config.py").read_text()
    for default in ('kl_estimator_type: str = "k3"', "use_kl_loss: bool = True", "use_kl_in_reward: bool = False",
                    "kl_loss_coef: float = 0.001"):
        assert default in config


def test_skyrl_kl_in_reward(skyrl):
    """use_kl_in_reward (exclusive with use_kl_loss): ``apply_reward_kl_penalty`` subtracts
    kl_loss_coef x k_t at the rollout policy from each token's reward; the default advantage 'grpo'
    sums a sequence's token rewards: with k1, the surrogate's gradient is ``reinforce``'s."""
    trainer = installed_file("skyrl/train/trainer.py").read_text()
    assert "action_log_probs,\n                base_action_log_probs,\n                loss_mask=loss_masks_all," in trainer
    assert "scores = token_level_rewards.sum(dim=-1)" in installed_file(SKYRL_PPO).read_text()
    assert '"use_kl_in_reward and use_kl_loss should be mutually exclusive"' in installed_file(
        "skyrl/train/utils/utils.py").read_text()
    logps, ref, _, mask = random_logps(seed=25)
    k = skyrl["compute_approx_kl"](logps.detach(), ref, loss_mask=mask, kl_estimator_type="k1")
    rewards = run_block("skyrl/train/trainer.py", "rewards = rewards - kl * max(0, kl_loss_coef)", 1,
                        {"rewards": torch.zeros_like(k), "kl": k, "kl_loss_coef": 1.0})["rewards"]
    sequence_return = rewards.sum(dim=-1, keepdim=True).expand_as(rewards)
    ours = kl.per_token_kl_loss("reinforce", logps, ref, mask)
    assert_same(_surrogate(logps, sequence_return), ours, logps, mask, value=False)


# -- AReaL --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def areal():
    return load(AREAL_DATA, ("KLEstimator",))["KLEstimator"]


@pytest.mark.parametrize(("name", "estimator"), (("k1", "k1-loss"), ("k2", "k2-loss"), ("k3", "k3-loss")))
def test_areal_kl_estimator(areal, name, estimator):
    """actor.kl_estimator k1 / k2 / k3 (``KLEstimator``): the named estimator's value (float32,
    clamped to [-10, 10], k1 included); AReaL uses it in the reward only."""
    logps, ref, _, mask = random_logps(seed=30 + len(name), dtype=torch.float32)
    assert_same(areal(name)(logps, ref), kl.per_token_kl_loss(estimator, logps, ref, mask), logps, mask,
                 rtol=1e-5, atol=1e-6)
    assert areal(name)(torch.tensor([-0.5]), torch.tensor([-30.0])).item() == 10.0  # clamped, k1 included


@pytest.mark.parametrize(("name", "estimator"), (("k1", "reinforce-future"), ("k3", "k3-reward")))
def test_areal_kl_in_reward(areal, name, estimator):
    """``compute_advantages``: reward -kl_ctl x k_t at the old (rollout or proximal) log-probs, then GAE
    (discount = gae_lambda = 1 by default); with no critic (values 0) the advantage is the reward-to-go,
    and the surrogate's gradient is ``estimator``'s. The block runs verbatim; the last column is the
    position after the completion, outside loss_mask, as in AReaL's layout."""
    source = installed_file("areal/api/cli_args.py").read_text()
    assert "discount: float = field(\n        default=1.0" in source and "gae_lambda: float = field(\n        default=1.0" in source
    logps, ref, _, mask = random_logps(seed=33, dtype=torch.float32)
    B, T = logps.shape
    pad = torch.zeros(B, 1)
    loss_mask = torch.cat([mask.float(), pad], 1)
    old_logp, ref_logp = torch.cat([logps.detach(), pad], 1) * loss_mask, torch.cat([ref, pad], 1) * loss_mask
    self = SimpleNamespace(kl_ctl=1.0, kl_estimator=areal(name), discount=1.0, gae_lambda=1.0)
    rewards = run_block(AREAL_ACTOR, "rewards = -self.kl_ctl * self.kl_estimator(old_logp, ref_logp)", 1,
                        {"self": self, "old_logp": old_logp, "ref_logp": ref_logp})["rewards"]
    scope = run_block(AREAL_ACTOR, "advantages_reversed = [", 16, {
        "self": self, "rewards": rewards * loss_mask, "bs": B, "max_seqlen": T + 1, "values": torch.zeros(B, T + 1),
        "seq_no_eos_mask": torch.zeros(B, dtype=torch.bool), "loss_mask": loss_mask})
    returns = scope["advantages"][:, :T]
    ours = kl.per_token_kl_loss(estimator, logps, ref, mask)
    assert_same(_surrogate(logps, returns), ours, logps, mask, rtol=1e-5, atol=1e-6, value=False)


def test_areal_without_ref_model_rewards_entropy(areal):
    """With kl_ctl > 0 (default 0.1) but no ``ref`` model configured, ref_logp is 0: the "KL" reward is
    -kl_ctl x log pi_old (k1), an entropy bonus, not a KL to any reference."""
    source = installed_file("areal/api/cli_args.py").read_text()
    assert 'kl_ctl: float = field(default=0.1, metadata={"help": "KL divergence coefficient"})' in source
    assert 'default="k1",\n        metadata={"help": "KL divergence estimator", "choices": ["k1", "k2", "k3"]},' in source
    assert "if config.actor.kl_ctl > 0 and config.ref is not None:" in installed_file("areal/trainer/rl_trainer.py").read_text()
    old_logp = -torch.rand(2, 3)
    scope = run_block(AREAL_ACTOR, "ref_logp = data.get(\"ref_logp\")", 3, {"data": {}, "old_logp": old_logp})
    rewards = -0.1 * areal("k1")(old_logp, scope["ref_logp"])
    torch.testing.assert_close(rewards, -0.1 * old_logp)


# -- oat ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oat_ops():
    return load("oat/utils/ops.py", ("masked_mean", "masked_sum"))


@pytest.mark.parametrize("critic_type", ("grpo", "drgrpo"))
def test_oat_k3_loss(oat_ops, critic_type):
    """args.beta > 0 (OATArgs' default 0.1): ``learning_step`` adds beta x the k3 of the current and
    reference log-probs (log-ratio clamped to [-40, 40]), no importance weight; aggregated per
    sequence by masked_mean (1/length: critic_type grpo, ppo) or masked_sum / generate_max_length
    (drgrpo), then the batch mean. The statements run verbatim."""
    assert "beta: float = 0.1" in installed_file("oat/args.py").read_text()
    logps, ref, _, mask = random_logps(seed=40)
    T = logps.shape[1]
    aggregator = oat_ops["masked_mean"] if critic_type == "grpo" else (
        lambda values, mask, axis: oat_ops["masked_sum"](values, mask, axis, constant_normalizer=T))
    scope = run_block(OAT_PPO, "log_ratio = (mb_ref_logps - new_logps).clamp(-40.0, 40.0)", 2,
                      {"mb_ref_logps": ref, "new_logps": logps})
    scope = run_block(OAT_PPO, "reg_loss = self.masked_aggregator(kl3, mb_response_masks, axis=1)", 2, {
        "self": SimpleNamespace(masked_aggregator=aggregator), "kl3": scope["kl3"], "mb_response_masks": mask.double(),
        "args": SimpleNamespace(beta=0.1), "mb_loss_masks": torch.ones(logps.shape[0], dtype=torch.float64)})
    terms = kl.per_token_kl_loss("k3-loss", logps, ref, mask)
    mode = "seq-mean-token-mean" if critic_type == "grpo" else "seq-mean-token-sum-norm"
    ours = 0.1 * AGG[mode](terms, mask.double())
    assert_same(scope["reg_loss"].reshape(1, 1), ours.reshape(1, 1), logps, torch.ones(1, 1, dtype=torch.bool))


def test_oat_k1_in_reward():
    """PPOArgs.kl_penalty_coef > 0 (default 0): -coef x k1_t at the rollout log-probs in the token
    rewards; critic_type grpo / drgrpo sums them per sequence (``compute_monte_carlo_advantages``):
    the surrogate's gradient is ``reinforce``'s. beta and kl_penalty_coef can both be on (KL twice)."""
    assert "kl_penalty_coef: float = field(\n        default=0," in installed_file(OAT_PPO).read_text()
    logps, ref, _, mask = random_logps(seed=41)
    scope = run_block(OAT_PPO, "kl_rewards = -args.kl_penalty_coef * (logps - ref_logps) * response_masks", 1, {
        "args": SimpleNamespace(kl_penalty_coef=1.0), "logps": logps.detach(), "ref_logps": ref,
        "response_masks": mask.double()})
    rewards = run_block(OAT_PPO, "rewards = rewards.sum(-1)", 1, {"rewards": scope["kl_rewards"]})["rewards"]
    ours = kl.per_token_kl_loss("reinforce", logps, ref, mask)
    assert_same(_surrogate(logps, rewards.unsqueeze(-1).expand_as(logps)), ours, logps, mask, value=False)
