"""This library's KL term in verl's and OpenRLHF's training loss, as a patch of one statement of their source.

Neither framework has a hook for the KL term: verl 0.9.1 computes it in
``verl/workers/utils/losses.py::ppo_loss`` from ``kl_penalty(log_prob, ref_log_prob, kl_loss_type)``,
and OpenRLHF 0.11.2 in ``openrlhf/trainer/ray/ppo_actor.py::training_step`` from
``compute_approx_kl(...)``; neither function sees the response mask, so a sequence-level estimator
cannot be passed in as a replacement function. The patch replaces that one statement with
``per_token_kl_loss(estimator, current, reference, mask, behaviour_logprobs=old)``: the old (rollout)
log-probs both frameworks already hold become the behaviour policy, and the framework's own
aggregation (``loss_agg_mode``) and coefficient (``kl_loss_coef`` / ``kl_ctl``) are kept, so use a
token-sum-over-a-constant mode (verl ``token-mean`` with a global token count, or
``seq-mean-token-sum``; OpenRLHF ``token-mean``) for the estimator's guarantee to hold.

    python -m kl_estimators.integrations.source_patches verl reinforce-future-is PATH/site-packages

prints the unified diff to apply (``patch -p0``) to the installed file (nothing is written).
``tests/test_frameworks_source_patches.py`` applies it to the locked versions' files and compiles
them; running the patched trainers needs their GPU stack and is untested here. Estimators that need
logits are refused: neither code path has the vocabulary logits at that point.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

from kl_estimators.info import ESTIMATOR_INFO


@dataclass(frozen=True)
class SourcePatch:
    """Replace ``old`` (exactly once) in ``file`` by ``new`` formatted with the estimator's name."""

    framework: str
    file: str
    old: str
    new: str
    imports_after: str


PATCHES: dict[str, SourcePatch] = {
    "verl": SourcePatch(
        framework="verl",
        file="verl/workers/utils/losses.py",
        old="        kld = kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=config.kl_loss_type)\n",
        new="        kld = per_token_kl_loss(\n"
            "            {estimator!r}, log_prob, ref_log_prob, response_mask, behaviour_logprobs=old_log_prob\n"
            "        )\n",
        imports_after="import torch\n",
    ),
    "openrlhf": SourcePatch(
        framework="openrlhf",
        file="openrlhf/trainer/ray/ppo_actor.py",
        old="                kl = compute_approx_kl(\n"
            "                    action_log_probs,\n"
            "                    base_action_log_probs,\n"
            "                    log_probs_old=old_action_log_probs,\n"
            "                    kl_estimator=self.args.algo.kl.estimator,\n"
            "                    unbiased_gradient=self.args.algo.kl.unbiased_gradient,\n"
            "                )\n",
        new="                kl = per_token_kl_loss(\n"
            "                    {estimator!r},\n"
            "                    action_log_probs,\n"
            "                    base_action_log_probs,\n"
            "                    experience.action_mask.bool(),\n"
            "                    behaviour_logprobs=old_action_log_probs,\n"
            "                )\n",
        imports_after="import torch\n",
    ),
}

_IMPORT = "from kl_estimators import per_token_kl_loss\n"


def patched_source(framework: str, estimator: str, source: str) -> str:
    """``source`` (the framework's file) with its KL statement replaced; ValueError if it cannot be."""
    if framework not in PATCHES:
        raise ValueError(f"framework must be one of {tuple(PATCHES)}, got {framework!r}")
    if estimator not in ESTIMATOR_INFO:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATOR_INFO)}, got {estimator!r}")
    if ESTIMATOR_INFO[estimator].needs_logits:
        raise ValueError(f"estimator {estimator!r} needs the vocabulary logits, which {framework}'s KL code does not have")
    patch = PATCHES[framework]
    for text, what in ((patch.old, "KL statement"), (patch.imports_after, "import line")):
        if source.count(text) != 1:
            raise ValueError(f"{patch.file}: the {what} to replace is not there exactly once (another {framework} version?)")
    source = source.replace(patch.old, patch.new.format(estimator=estimator))
    return source.replace(patch.imports_after, patch.imports_after + _IMPORT, 1)


def diff(framework: str, estimator: str, site_packages: Path) -> str:
    """The unified diff (paths relative to ``site_packages``) that ``patched_source`` makes."""
    path = site_packages / PATCHES[framework].file if framework in PATCHES else site_packages
    if not path.is_file():
        raise ValueError(f"no file {path}: pass the site-packages folder where {framework} is installed")
    before = path.read_text()
    after = patched_source(framework, estimator, before)
    name = PATCHES[framework].file
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), name, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", help=f"one of {tuple(PATCHES)}")
    parser.add_argument("estimator", help="an ESTIMATOR_INFO name without logits, e.g. reinforce-future-is")
    parser.add_argument("site_packages", type=Path, help="the folder that holds the installed framework")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(diff(args.framework, args.estimator, args.site_packages))
    except ValueError as error:
        print(f"source_patches: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
