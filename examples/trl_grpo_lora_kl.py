"""A TRL GRPO script with LoRA, switched to this library's unbiased KL in 3 lines, each marked
`# kl_estimators`. With PEFT the reference is TRL's: the same model with its adapters disabled.

    pip install ".[frameworks]" peft    # from a clone of lmgym-kl (not on the package index yet)
    python examples/trl_grpo_lora_kl.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 100
"""
import argparse

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig

from kl_estimators.integrations.trl import KLGRPOTrainer  # kl_estimators (was: from trl import GRPOTrainer)


def reward_positive(completions, **kwargs):
    """The task: completions that use positive words."""
    words = ("good", "great", "fun", "best", "love")
    return [float(sum(completion.count(word) for word in words)) for completion in completions]


parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a causal LM: Hub name or local folder")
parser.add_argument("--max-steps", type=int, default=100)
parser.add_argument("--output-dir", default="grpo-lora-kl")
cli = parser.parse_args()

dataset = Dataset.from_dict({"prompt": ["this movie was", "the plot of the film", "i watched it and"] * 8})
args = GRPOConfig(
    output_dir=cli.output_dir,
    beta=0.04,
    num_generations=4,
    per_device_train_batch_size=4,
    max_completion_length=16,
    max_steps=cli.max_steps,
    num_iterations=2,
    learning_rate=1e-4,
    logging_steps=1,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = KLGRPOTrainer(  # kl_estimators (was: GRPOTrainer)
    model=cli.model, reward_funcs=reward_positive, args=args, train_dataset=dataset, peft_config=lora,
    kl_estimator="analytic-future-is",  # kl_estimators: unbiased with num_iterations > 1, any length
)
trainer.train()
