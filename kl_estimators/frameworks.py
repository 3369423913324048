"""The framework map: which estimator of this library each KL option of the RL frameworks computes.

One row per option, at the version in ``FRAMEWORK_VERSIONS`` (the versions pinned in
requirements.lock). Every row names the test that calls that framework's own installed code on
random tensors and checks value and gradient against the named estimator (``ESTIMATOR_INFO`` states
what its expected gradient equals); ``tests/test_frameworks_map.py`` checks that each named test
exists and that the estimators are real. docs/frameworks.md is ``markdown_table()``, and
``not_covered_table()`` for the frameworks in ``NOT_COVERED`` (with the reason). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAMEWORK_VERSIONS: dict[str, str] = {
    "trl": "1.16.0", "verl": "0.9.1", "openrlhf": "0.11.2", "skyrl": "0.3.0", "areal": "1.0.4",
    "unsloth-zoo": "2026.10.9", "liger-kernel": "0.8.5", "oat": "0.2.4",
}
"""The release of each framework whose installed source the map was read from and tested against."""

_TRL = "tests/test_frameworks_trl.py"
_VO = "tests/test_frameworks_verl_openrlhf.py"
_SAO = "tests/test_frameworks_skyrl_areal_oat.py"
_FUSED = "tests/test_frameworks_fused_losses.py"


@dataclass(frozen=True)
class FrameworkOption:
    """One KL option of one framework: where it is, what it equals here, and the test that proves it.

    Attributes:
        framework: the framework's key in ``FRAMEWORK_VERSIONS`` (e.g. ``"trl"``).
        option: the setting, as the framework's own config spells it.
        file: where in the framework's source the option's KL is computed.
        estimator: the ``ESTIMATOR_INFO`` name its gradient equals, or ``"none: ..."`` with why not.
        notes: the caveat a user needs (aggregation, clamping, defaults).
        test: the ``tests/...::test_...`` that runs the framework's own code to prove the row.
    """

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
_SKYRL_KL = "skyrl/backends/skyrl_train/utils/ppo_utils.py `compute_approx_kl`"
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
    FrameworkOption("skyrl", "trainer.algorithm.kl_estimator_type 'k1' / 'abs' / 'k2' / 'k3' (default 'k3')", _SKYRL_KL,
                    "k1-loss / abs-loss / k2-loss / k3-loss",
                    "k3 clamped as verl's low_var_kl; the same function gives the in-reward KL", f"{_SAO}::test_skyrl_kl_loss"),
    FrameworkOption("skyrl", "use_kl_loss=True (the default), kl_loss_coef=0.001", "skyrl/backends/skyrl_train/workers/worker.py",
                    "(aggregation) each sequence's token mean, then the batch mean",
                    "current and reference log-probs only: no importance weight at any epoch; weights 1/length",
                    f"{_SAO}::test_skyrl_kl_loss_lines"),
    FrameworkOption("skyrl", "use_kl_in_reward=True (exclusive with use_kl_loss), k1", "skyrl/train/trainer.py `apply_reward_kl_penalty`",
                    "reinforce (advantage_estimator 'grpo': sequence sum of token rewards)",
                    "k at the rollout policy (action_log_probs), -kl_loss_coef x k_t per token; the group baseline and std scaling apply to it",
                    f"{_SAO}::test_skyrl_kl_in_reward"),
    FrameworkOption("areal", "actor.kl_estimator 'k1' (default) / 'k2' / 'k3'", "areal/utils/data.py `KLEstimator`",
                    "k1-loss / k2-loss / k3-loss (values)", "float32, clamped to [-10, 10] (k1 too); used in the reward only",
                    f"{_SAO}::test_areal_kl_estimator"),
    FrameworkOption("areal", "actor.kl_ctl > 0 (default 0.1), k1 / k3", "areal/trainer/ppo/actor.py `compute_advantages`",
                    "reinforce-future / k3-reward (GAE, discount = gae_lambda = 1 by default, no critic)",
                    "-kl_ctl x k_t at the old (rollout or proximal) log-probs in each token's reward",
                    f"{_SAO}::test_areal_kl_in_reward"),
    FrameworkOption("areal", "kl_ctl > 0 with no ref model configured", "areal/trainer/ppo/actor.py `compute_advantages`",
                    "none: an entropy bonus", "ref_logp defaults to 0, so the reward is -kl_ctl x log pi_old: no KL to any reference",
                    f"{_SAO}::test_areal_without_ref_model_rewards_entropy"),
    FrameworkOption("oat", "beta > 0 (OATArgs default 0.1), PPO learner", "oat/algorithms/ppo.py `learning_step`",
                    "k3-loss (each sequence / its length, batch mean; drgrpo: / generate_max_length)",
                    "log-ratio clamped to [-40, 40]; no importance weight", f"{_SAO}::test_oat_k3_loss"),
    FrameworkOption("oat", "kl_penalty_coef > 0 (default 0)", "oat/algorithms/ppo.py `learning_step`",
                    "reinforce (critic_type grpo / drgrpo: sequence sum)",
                    "-coef x k1_t at the rollout log-probs; can be on with beta > 0 (KL counted twice)", f"{_SAO}::test_oat_k1_in_reward"),
    FrameworkOption("unsloth-zoo", "TRL's beta > 0, use_bias_correction_kl False / True", "unsloth_zoo/rl_replacements.py `grpo_compute_loss`",
                    "k3-loss / k3-ratio", "k3 (x rho) clamped to [-10, 10] after the ratio, unlike TRL; TRL's loss_type aggregation",
                    f"{_FUSED}::test_unsloth_grpo_kl"),
    FrameworkOption("unsloth-zoo", "the clamp at 10", "unsloth_zoo/rl_replacements.py `grpo_compute_loss`", "none beyond the clamp",
                    "a token with k3 > 10 contributes a constant (no gradient)", f"{_FUSED}::test_unsloth_k3_clamp"),
    FrameworkOption("liger-kernel", "LigerFusedLinearGRPOLoss(beta=0.04, use_bias_correction_kl=False / True)",
                    "liger_kernel/chunked_loss/grpo_loss.py `ppo_loss_fn`", "k3-loss / k3-ratio",
                    "unclamped; the reference log-prob given or fused from ref_input / ref_weight; runs on CPU with compiled=False",
                    f"{_FUSED}::test_liger_grpo_kl"),
    FrameworkOption("liger-kernel", "use_ref_model=False", "liger_kernel/chunked_loss/grpo_loss.py `ppo_loss_fn`", "none: KL 0",
                    "the reference log-prob is the policy's own, detached", f"{_FUSED}::test_liger_without_reference_has_no_kl"),
    FrameworkOption("trl", "kernels/chunked_divergence.py ChunkedDivergenceFunction, beta=1.0", "trl/kernels/chunked_divergence.py",
                    "analytic (KL_t from hidden states and output layers, as fused_kl)",
                    "used by the distillation trainers only: no TRL RL trainer offers the exact KL", f"{_FUSED}::test_trl_chunked_divergence_is_the_exact_kl"),
)
"""Every row of the framework map (docs/frameworks.md is generated from it), each proven by its ``test``."""


NOT_COVERED: dict[str, str] = {
    "NeMo-RL": "`nemo-rl` on the package index is a 0.0.0 placeholder (two files, no RL code): nothing released to test",
    "prime-rl": "not on the package index",
    "SkyRL-train": "`skyrl-train` 0.3.1 requires Python 3.12 exactly; `skyrl` (above), the package it became, has the same "
                   "estimators (it masks with a select where skyrl-train multiplies by the mask)",
}


def markdown_table() -> str:
    """docs/frameworks.md's table, generated from ``FRAMEWORK_OPTIONS``."""
    rows = ["| framework | option | file | equals here | notes | tested by |", "|---|---|---|---|---|---|"]
    for row in FRAMEWORK_OPTIONS:
        cells = (f"{row.framework} {row.version}", row.option, row.file, row.estimator, row.notes, f"`{row.test}`")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def not_covered_table() -> str:
    """docs/frameworks.md's list of the frameworks the map does not cover, and why."""
    rows = ["| framework | why it is not covered |", "|---|---|"]
    rows += [f"| {name} | {reason} |" for name, reason in NOT_COVERED.items()]
    return "\n".join(rows)
