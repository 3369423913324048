"""Drop-in KL terms for other RL fine-tuning frameworks, one module per framework.

Not imported by ``import kl_estimators`` (which stays torch-only): ``kl_estimators.integrations.trl``
needs ``pip install "lmgym-kl[frameworks]"``; ``.verl`` and ``.openrlhf`` need only torch.
"""
