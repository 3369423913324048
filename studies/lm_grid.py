"""The LM study's grid: each variant's label and the flags of ``python -m agents.ppo_kl`` that make it;
read by the runner ``studies.lm`` and by the reports."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A KL configuration of the study: its label in tables and plots, and its CLI flags."""

    label: str
    flags: tuple[str, ...]


VARIANTS: dict[str, Variant] = {
    "k1": Variant("k1 reward (RL4LMs)", ("--kl-reward", "k1", "--no-analytic-grad")),
    "analytic-biased": Variant("analytic reward, no analytic grad (biased)", ("--kl-reward", "analytic", "--no-analytic-grad")),
    "k1-agrad": Variant("k1 reward + analytic grad", ("--kl-reward", "k1", "--analytic-grad")),
    "analytic-agrad": Variant("analytic reward + analytic grad", ("--kl-reward", "analytic", "--analytic-grad")),
    "k3-loss": Variant("k3 loss, no KL reward (GRPO)", ("--kl-loss", "k3-loss", "--kl-reward", "none", "--no-analytic-grad")),
    # NLPO: analytic-agrad's KL handling, sampling restricted to the top-p nucleus of a masking
    # policy synced every 5 iterations (agents.rollout.masking); not in the default grid
    **{
        f"nlpo-p{p:g}": Variant(
            f"NLPO top-p {p:g} (analytic reward + grad)",
            ("--kl-reward", "analytic", "--analytic-grad", "--mask-top-p", str(p), "--mask-sync-every", "5"),
        )
        for p in (0.9, 0.5)
    },
}
DEFAULT_VARIANTS = ["k1", "analytic-biased", "k1-agrad", "analytic-agrad", "k3-loss"]
