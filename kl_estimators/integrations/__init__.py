"""Drop-in KL terms for other RL fine-tuning frameworks.

Not imported by ``import kl_estimators`` (which stays torch-only):

- ``kl_estimators.integrations.trl``: ``KLGRPOTrainer``, needs ``pip install ".[frameworks]"`` from a
  clone (lmgym-kl is not on the package index yet);
- ``kl_estimators.integrations.source_patches``: the one-statement patch of verl's / OpenRLHF's KL
  term (torch-free; prints a diff).
"""
