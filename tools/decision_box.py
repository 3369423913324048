"""The "Which estimator?" box at the top of docs/index.md and docs/kl-estimators.md, one text for both.

Used through ``<!-- generated: tools.decision_box:which_estimator -->`` (see tools/docs_blocks.py);
the lists of unbiased estimators come from ``kl_estimators.ESTIMATOR_INFO``, and the example in the
box is run by tests/test_docs_snippets.py on both pages.
"""

from __future__ import annotations

from kl_estimators import ESTIMATOR_INFO

_EXAMPLE = '''```python
import kl_estimators as kl

several_steps_per_batch = True   # PPO/GRPO with more than one optimisation step per batch
unbiased = [name for name, info in kl.ESTIMATOR_INFO.items()
            if (info.unbiased_off_policy if several_steps_per_batch else info.unbiased_on_policy)]
print(unbiased)                  # {off}
print(kl.ESTIMATOR_INFO["k3-loss"].off_policy)   # what GRPO's k3 term estimates instead
```'''


def _names(off_policy: bool) -> list[str]:
    return [n for n, i in ESTIMATOR_INFO.items() if (i.unbiased_off_policy if off_policy else i.unbiased_on_policy)]


def which_estimator() -> str:
    """The admonition: what to use on- and off-policy, what to avoid, and a runnable example."""
    on, off = _names(False), _names(True)
    example = _EXAMPLE.replace("{off}", repr(off)).replace("\n", "\n    ")
    return f"""!!! tip "Which estimator?"
    - **One optimisation step per batch** (on-policy): `analytic-future`, the exact KL in the
      reward plus its analytic gradient; without logits, `reinforce-future` (k1 in the reward).
      Unbiased on-policy: {", ".join(f"`{n}`" for n in on)}.
    - **Several steps per batch** (PPO/GRPO epochs, a stale or offline sampler):
      `analytic-future-is`; without logits, `reinforce-future-is`. Unbiased off-policy:
      {", ".join(f"`{n}`" for n in off)} only.
    - **In TRL**: `KLGRPOTrainer(..., kl_estimator="analytic-future-is")`
      ([tutorial](tutorial.md#switch-trl-grpo-to-an-unbiased-kl)).
    - **Avoid** GRPO's `k3-loss` (its expected gradient is the forward KL's at one token),
      `k1-loss` (no signal) and the k2 family (biased for sequences, with high variance).

    Among the unbiased ones, `analytic-future(-is)` had the lowest variance in the regimes measured
    (exact moments on tabular policies, 3 seeds; SmolLM2-135M's output layer, 3 policies), except
    the tabular problem furthest from pi_ref: [Which estimator?](variance.md#3-recommendation).
    Which is unbiased where, from the estimator table itself:

    {example}"""
