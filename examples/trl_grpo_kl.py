"""A TRL GRPO script whose KL term is this library's unbiased estimator: 4 lines differ from plain TRL,
each marked `# kl_estimators`.

    pip install ".[frameworks]"    # from a clone of lmgym-kl (not on the package index yet)
    python examples/trl_grpo_kl.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 100
"""
import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from kl_estimators.integrations.trl import KLGRPOTrainer  # kl_estimators (was: from trl import GRPOTrainer)


def reward_short(completions, **kwargs):
    """The task: completions of about 20 characters."""
    return [-abs(20 - len(completion)) / 20 for completion in completions]


parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a causal LM: Hub name or local folder")
parser.add_argument("--max-steps", type=int, default=100)
parser.add_argument("--output-dir", default="grpo-kl")
cli = parser.parse_args()

dataset = Dataset.from_dict({"prompt": ["this movie was", "the plot of the film", "i watched it and"] * 8})
args = GRPOConfig(
    output_dir=cli.output_dir,
    beta=0.04,  # kl_estimators: the KL coefficient (TRL's default beta=0.0 has no KL term)
    num_generations=4,
    per_device_train_batch_size=4,
    max_completion_length=16,
    max_steps=cli.max_steps,
    num_iterations=2,  # two steps per batch: the KL estimator weights by pi/pi_old itself
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = KLGRPOTrainer(  # kl_estimators (was: GRPOTrainer)
    model=cli.model, reward_funcs=reward_short, args=args, train_dataset=dataset,
    kl_estimator="analytic-future-is",  # kl_estimators: unbiased with num_iterations > 1, any length
)
trainer.train()
