"""The command line (``python -m agents.ppo_kl``): arguments, the run directory, monitoring, evaluation, curves, the model card and the finish steps."""
