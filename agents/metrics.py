"""The names of PPOKL's metrics, as SB3's logger and ``metrics.csv`` spell them (one place, so the
algorithm, the monitor, the plots, the model card and the studies cannot disagree)."""
from __future__ import annotations

# rollout statistics (PPOKL.rollout_stats, averaged over ranks)
TASK_REWARD = "rollout/task_reward"  # mean task reward per episode
KL_ANALYTIC = "rollout/kl_analytic"  # mean exact sequence KL(pi || pi_ref)
KL_IN_REWARD = "rollout/kl_in_reward"  # mean sequence sum of the KL term in the reward
KL_COEF = "rollout/kl_coef"  # beta used for the rollout
GEN_LENGTH = "rollout/gen_length"  # mean generated tokens per episode
MASK_TOKENS = "rollout/mask_tokens"  # mean allowed tokens per step (action masks only)
ROLLOUT_TOKENS_PER_S = "time/rollout_tokens_per_s"  # generated tokens per second of rollout, summed over ranks

# update statistics (SB3's logger, means over minibatches)
TRAIN_PREFIX = "train/"
POLICY_GRADIENT_LOSS = "train/policy_gradient_loss"
VALUE_LOSS = "train/value_loss"
ENTROPY_LOSS = "train/entropy_loss"
KL_LOSS = "train/kl_loss"
LOSS = "train/loss"
CLIP_FRACTION = "train/clip_fraction"
APPROX_KL = "train/approx_kl"
EXPLAINED_VARIANCE = "train/explained_variance"
LEARNING_RATE = "train/learning_rate"
N_UPDATES = "train/n_updates"
CLIP_RANGE = "train/clip_range"
TRAIN_SECONDS = "time/train_seconds"

# per-iteration timing (the monitor)
TIME_PREFIX = "time/"
ITERATION_SECONDS = "time/iteration_seconds"
TOKENS_PER_S = "time/tokens_per_s"
TOTAL_TIMESTEPS = "time/total_timesteps"  # SB3's progress.csv

# held-out evaluation (agents.cli.evaluation)
EVAL_PREFIX = "eval/"
EVAL_SENTIMENT = "eval/sentiment"
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_DISTINCT_1 = "eval/distinct_1"
EVAL_DISTINCT_2 = "eval/distinct_2"
