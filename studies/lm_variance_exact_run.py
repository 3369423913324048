"""``python -m studies.lm_variance_exact_run``: the LM variance study's cells measured exactly.

    python -m studies.lm_variance_exact_run                                   # every policy, on and off
    python -m studies.lm_variance_exact_run --behaviours behaviour,behaviour-5  # staleness 1 and 5 iterations
    python -m studies.lm_variance_exact_run --seed 1 --behaviours ""          # seed 1's policies, on-policy only

The same policies, regimes, sequences (prompt uniform over the training prompts, continuation
from the full softmax; chunk i drawn with seed 2i on-policy, 2i + 1 off-policy) and estimators
as ``studies.lm_variance``, but the statistics come from ``studies.lm_variance_exact.ExactSums``:
exact output-layer trace, |E g|^2 and |bias|^2 against grad KL (``analytic-future``'s class), no
projection. One JSON per (policy, regime, behaviour) under ``--out``; an existing one is
skipped, so the command resumes cell by cell (a cell is not resumed midway: its running sums,
one [V, d] float64 per class, are not written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import studies.lm_variance as lmv
from agents.cli.run_dir import atomic_write
from lmgym.assets import load_causal_lm
from lmgym.task import ContinuationTask, log_prob
from studies.lm_variance_exact import ExactSums
from studies.lm_variance_policies import BEHAVIOUR, BETAS, run_dir
from studies.moments_grid import label


def measure_cell(policy, behaviour, task: ContinuationTask, regime: str, n_sequences: int, chunk: int) -> dict:
    """Sample ``n_sequences`` in chunks and return ``ExactSums.statistics`` with the cell's KLs."""
    runs = lmv.runs_for(regime)
    labels = [label(e, o) for e, o in runs]
    sums = ExactSums(labels, regime)
    kl, log_ratio, start = [], [], time.perf_counter()
    for i in range(-(-n_sequences // chunk)):
        seed = 2 * i + (regime == "off")
        size = min(chunk, n_sequences - i * chunk)
        s = lmv.sample_batch(policy, behaviour, task, size, torch.Generator().manual_seed(seed), np.random.default_rng(seed))
        sums.add({name: lmv.logit_gradient(s, e, o) for name, (e, o) in zip(labels, runs)}, s.hidden)
        kl.append(lmv.kl_along(s).double())
        if s.behaviour_logprobs is not None:
            logp = log_prob(s.logits, s.tokens)
            log_ratio.append(torch.where(s.mask, logp - s.behaviour_logprobs, 0.0).sum(-1).double())
    out = sums.statistics()
    out["kl_pi_ref"] = float(torch.cat(kl).mean())
    out["kl_mu_pi"] = -float(torch.cat(log_ratio).mean()) if log_ratio else 0.0
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.lm_variance_exact_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/lm_variance"), help="the policies' run folders")
    parser.add_argument("--out", type=Path, default=Path("results/lm_variance_exact"))
    parser.add_argument("--betas", type=lambda s: [float(x) for x in s.split(",")], default=list(BETAS))
    parser.add_argument("--seed", type=int, default=0, help="the policies' training seed (lm_variance_policies --seed)")
    parser.add_argument("--behaviours", default=BEHAVIOUR, help="comma-separated behaviour folders inside each run (off-policy mu)")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=5, help="sequences per forward batch (memory: ~60 MB per sequence)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded in each cell with its seconds)")
    options = parser.parse_args(argv)
    if options.threads < 1:
        parser.exit(2, "error: --threads must be >= 1\n")
    names = [run_dir(Path(), beta, options.seed).name for beta in options.betas]
    behaviours = [b for b in options.behaviours.split(",") if b]
    missing = [options.root / n / b for n in names for b in ["policy", *behaviours] if not (options.root / n / b).is_dir()]
    if missing:
        print(f"error: no policy at {missing[0]}; run python -m studies.lm_variance_policies", file=sys.stderr)
        return 2
    torch.set_num_threads(options.threads)
    for name in names:
        policy = load_causal_lm(str(options.root / name / "policy"))[0]
        task = ContinuationTask(model=policy, ref_model=lmv.REFERENCE, reward=lambda xs: np.zeros(len(xs)),
                                max_prompt_tokens=lmv.PROMPT_TOKENS, max_new_tokens=lmv.NEW_TOKENS)
        for regime, mu_name in [("on", None), *(("off", b) for b in behaviours)]:
            path = options.out / f"{name}-{regime}{'' if mu_name in (None, BEHAVIOUR) else '-' + mu_name}.json"
            if path.is_file():
                continue
            behaviour = load_causal_lm(str(options.root / name / mu_name))[0] if mu_name else None
            record = {"policy": name, "regime": regime, "behaviour": mu_name, "threads": options.threads,
                      **measure_cell(policy, behaviour, task, regime, options.sequences, options.chunk)}  # fmt: skip
            atomic_write(path, lambda tmp, r=record: tmp.write_text(json.dumps(r, indent=1) + "\n"))
            print(f"{path.name}: {record['n_sequences']} sequences in {record['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
