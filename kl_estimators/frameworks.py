"""The framework map: which estimator of this library each KL option of TRL, verl and OpenRLHF computes.

One row per option, at the version in ``FRAMEWORK_VERSIONS`` (the versions pinned in
requirements.lock). Every row names the test that calls that framework's own installed code on
random tensors and checks value and gradient against the named estimator (``ESTIMATOR_INFO`` states
what its expected gradient equals); ``tests/test_frameworks_map.py`` checks that each named test
exists and that the estimators are real. docs/frameworks.md is ``markdown_table()``. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAMEWORK_VERSIONS: dict[str, str] = {"trl": "1.16.0", "verl": "0.9.1", "openrlhf": "0.11.2"}

_TRL = "tests/test_frameworks_trl.py"
_VO = "tests/test_frameworks_verl_openrlhf.py"


@dataclass(frozen=True)
class FrameworkOption:
    """One KL option of one framework: where it is, what it equals here, and the test that proves it."""

    framework: str
    option: str
    file: str
    estimator: str
    notes: str
    test: str

    @property
    def version(self) -> str:
        return FRAMEWORK_VERSIONS[self.framework]


_GRPO = "trl/trainer/grpo_trainer.py `_compute_loss`"
_VERL_KL = "verl/trainer/ppo/core_algos.py `kl_penalty`; verl/workers/utils/losses.py `ppo_loss`"
_ORLHF_KL = "openrlhf/models/utils.py `compute_approx_kl`; openrlhf/trainer/ray/ppo_actor.py `training_step`"

FRAMEWORK_OPTIONS: tuple[FrameworkOption, ...] = (
    FrameworkOption("trl", "GRPOConfig defaults: beta=0.0 (no KL), loss_type='dapo', importance_sampling_level='token', use_bias_correction_kl=True, num_iterations=1",
                    "trl/trainer/grpo_config.py", "k3-ratio (once beta > 0)",
                    "setting beta > 0 alone gives k3 x pi/pi_old, not k3", f"{_TRL}::test_trl_defaults"),
    FrameworkOption("trl", "beta > 0, use_bias_correction_kl=False (token or sequence level)", _GRPO, "k3-loss",
                    "beta x k3_t added to every token's loss before the loss_type aggregation", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "beta > 0, use_bias_correction_kl=True, importance_sampling_level='token'", _GRPO,
                    "k3-ratio (behaviour = old_per_token_logps)",
                    "coef_1 = exp(logp - old_logp), differentiable and unclamped, applied before the loss_type dispatch (every loss_type)",
                    f"{_TRL}::test_trl_bias_correction_token"),
    FrameworkOption("trl", "beta > 0, use_bias_correction_kl=True, importance_sampling_level='sequence'", _GRPO,
                    "none: k3_t x exp(mean_t log rho_t) (GSPO's weight, differentiable)",
                    "not the sequence ratio W_T: no unbiasedness statement",
                    f"{_TRL}::test_trl_bias_correction_sequence"),
    FrameworkOption("trl", "loss_type='dapo' (default), 'cispo', 'vespo'", _GRPO, "(aggregation) token sum / tokens in the generation batch",
                    "a constant normaliser: the estimator's guarantee holds (scaled)", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "loss_type='grpo', 'sapo'", _GRPO, "(aggregation) each sequence / its own length, then batch mean",
                    "weights sequences by 1/length: biases every estimator's gradient when lengths vary", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "loss_type='bnpo'", _GRPO, "(aggregation) token sum / tokens in the micro-batch",
                    "a random normaliser", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "loss_type='dr_grpo'", _GRPO, "(aggregation) token sum / (B x max_completion_length)",
                    "a constant normaliser", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "loss_type='luspo'", _GRPO, "(aggregation) sequence sums, batch mean",
                    "the sequence-level KL itself (multiplies the per-token mean by the length)", f"{_TRL}::test_trl_k3_loss"),
    FrameworkOption("trl", "PPOTrainer, PPOConfig.kl_estimator", "absent from the 1.16.0 wheel (moved to trl/experimental/ppo by TRL PR #4482, old path deleted in #5051)",
                    "none", "no PPO with k1/k3 in the reward in this TRL", f"{_TRL}::test_trl_has_no_ppo_trainer"),
    FrameworkOption("trl", "experimental GMPOTrainer, beta > 0", "trl/experimental/gmpo/gmpo_trainer.py `_compute_loss`",
                    "k3-loss (each sequence / its own length, batch mean)", "use_bias_correction_kl is ignored",
                    f"{_TRL}::test_trl_gmpo_kl"),
    FrameworkOption("trl", "RLOOConfig beta > 0", "trl/trainer/rloo_trainer.py `_generate_and_score_completions`",
                    "reinforce (on-policy)",
                    "reward -= beta x sum_t (log pi_old - log pi_ref) at the rollout policy; with num_iterations > 1 the penalty is stale: "
                    "E = grad KL(pi || pi_ref) - grad KL(pi || mu), see test_kl_expectations.py::test_stale_sequence_k1_reward_with_sequence_ratio",
                    f"{_TRL}::test_trl_rloo_kl_lines"),
    FrameworkOption("verl", "actor.use_kl_loss=True, kl_loss_type='k1' / 'kl'", _VERL_KL, "k1-loss",
                    "no old log-probs: no importance weight at any PPO epoch", f"{_VO}::test_verl_kl_penalty"),
    FrameworkOption("verl", "kl_loss_type='abs'", _VERL_KL, "abs-loss", "", f"{_VO}::test_verl_kl_penalty"),
    FrameworkOption("verl", "kl_loss_type='k2' / 'mse' (and 'k2+' / 'mse+')", _VERL_KL, "k2-loss", "", f"{_VO}::test_verl_kl_penalty"),
    FrameworkOption("verl", "kl_loss_type='k3' / 'low_var_kl'", _VERL_KL, "k3-loss",
                    "log-ratio clamped to [-20, 20], k3 to [-10, 10] (zero gradient beyond)", f"{_VO}::test_verl_k3_clamps"),
    FrameworkOption("verl", "kl_loss_type='k1+' / 'kl+'", _VERL_KL, "k1+", "the '+' suffix works since v0.8.0", f"{_VO}::test_verl_kl_penalty"),
    FrameworkOption("verl", "kl_loss_type='k3+' / 'low_var_kl+'", _VERL_KL, "k3+", "value clamped as low_var_kl", f"{_VO}::test_verl_kl_penalty"),
    FrameworkOption("verl", "kl_loss_type='abs+'", _VERL_KL, "none: value of abs-loss, gradient of k2-loss", "", f"{_VO}::test_verl_abs_plus"),
    FrameworkOption("verl", "kl_loss_type='full'", _VERL_KL, "none", "raises NotImplementedError", f"{_VO}::test_verl_full_raises"),
    FrameworkOption("verl", "actor.loss_agg_mode (applied to the KL loss too)", "verl/trainer/ppo/core_algos.py `agg_loss`",
                    "(aggregation) token-mean, token-sum, seq-mean-token-sum(-norm): token sums over constants; seq-mean-token-mean: 1/length per sequence",
                    "token-mean divides by the batch's token count", f"{_VO}::test_verl_loss_agg_mode"),
    FrameworkOption("verl", "ppo_loss: the KL lines", "verl/workers/utils/losses.py `ppo_loss`", "(placement) kl_loss_coef x agg_loss(kl_penalty(log_prob, ref_log_prob))",
                    "where the drop-in replaces the term", f"{_VO}::test_verl_ppo_loss_kl_lines"),
    FrameworkOption("verl", "algorithm.use_kl_in_reward=True, algorithm.kl_penalty='kl' / 'low_var_kl'", "verl/trainer/ppo/ray_trainer.py `apply_kl_penalty`",
                    "reinforce-future / k3-reward (GAE with gamma = lambda = 1)",
                    "k at the rollout policy (old_log_probs), fixed during the PPO epochs; estimator values as kl_penalty above",
                    f"{_VO}::test_verl_kl_in_reward_lines"),
    FrameworkOption("verl", "use_kl_in_reward=True and actor.use_kl_loss=True together", "verl/utils/config.py",
                    "(placement) both terms", "allowed with a printed NOTICE: the KL is counted twice", f"{_VO}::test_verl_kl_in_reward_and_loss_both_allowed"),
    FrameworkOption("verl", "algorithm.kl_ctrl.type='adaptive' (kl_coef, target_kl, horizon)", "verl/trainer/ppo/core_algos.py `AdaptiveKLController`",
                    "(coefficient) AdaptiveKLController", "only for the in-reward KL; fed the batch mean of per-token-mean KL, not the sequence KL",
                    f"{_VO}::test_adaptive_controllers"),
    FrameworkOption("openrlhf", "--algo.kl.use_loss, --algo.kl.estimator k1 / k2 / k3", _ORLHF_KL, "k1-loss / k2-loss / k3-loss",
                    "float32; value clamped to [-10, 10], k3's log-ratio to >= -10", f"{_VO}::test_openrlhf_kl_loss"),
    FrameworkOption("openrlhf", "--algo.kl.use_loss --algo.kl.unbiased_gradient", _ORLHF_KL,
                    "k3+is with weight_clip=10 (gradient); value of the chosen k1/k2/k3",
                    "w = pi/pi_old clamped at KL_IS_WEIGHT_CLIP = 10, detached", f"{_VO}::test_openrlhf_unbiased_gradient"),
    FrameworkOption("openrlhf", "KL in the reward (no --algo.kl.use_loss), estimator k1 / k3",
                    "openrlhf/models/utils.py `compute_reward`", "reinforce-future / k3-reward (gamma = 1)",
                    "k at the rollout policy, -kl_coef x k_t per token; rloo, reinforce_baseline, group_norm, dr_grpo force gamma = 1",
                    f"{_VO}::test_openrlhf_kl_in_reward"),
    FrameworkOption("openrlhf", "--actor.loss_agg_mode token-mean / seq-mean-token-mean", "openrlhf/models/loss.py `aggregate_loss`",
                    "(aggregation) token sum / batch tokens; each sequence / its own length", "the KL loss uses the same aggregation",
                    f"{_VO}::test_openrlhf_loss_agg_mode"),
    FrameworkOption("openrlhf", "KL loss x kl_ctl (--algo.kl.init_coef, --algo.kl.target)", "openrlhf/trainer/ray/ppo_actor.py `training_step`",
                    "(coefficient) the adaptive controller's value scales the KL loss too", "", f"{_VO}::test_openrlhf_actor_kl_lines"),
    FrameworkOption("openrlhf", "--algo.kl.target, --algo.kl.horizon", "openrlhf/trainer/ppo_utils/kl_controller.py `AdaptiveKLController`",
                    "(coefficient) AdaptiveKLController", "", f"{_VO}::test_adaptive_controllers"),
)


def markdown_table() -> str:
    """docs/frameworks.md's table, generated from ``FRAMEWORK_OPTIONS``."""
    rows = ["| framework | option | file | equals here | notes | tested by |", "|---|---|---|---|---|---|"]
    for row in FRAMEWORK_OPTIONS:
        cells = (f"{row.framework} {row.version}", row.option, row.file, row.estimator, row.notes, f"`{row.test}`")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)
