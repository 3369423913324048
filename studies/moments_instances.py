"""``python -m studies.moments_instances``: exact moments over many problem instances per sweep point.

    python -m studies.moments_instances                      # every missing cell, then the report
    python -m studies.moments_instances --seeds 0-11         # a subset of the instances (resumable)
    python -m studies.moments_instances --report             # only results/moments_instances/table.md

The per-problem companion of ``studies.moments``: the same problems (``make_instance``: random
pi_ref and sequence reward, pi = pi*_beta) and the same exact enumeration, but ``N_SEEDS`` = 48
instances per sweep point, so ``studies.moments_instances_report`` can give medians, quantiles
and the share of problems where a ranking holds instead of seed means. Per instance (V, T, seed):

- ``T`` (1..6 at V = 3), ``V`` (2..6 at T = 3), ``beta`` (0.1, 0.3, 1, 3 at V = T = 3): on-policy,
  beta = 0.3 unless swept, as in ``studies.moments``;
- ``kl``: beta chosen per instance (``beta_for_kl``, bisection on log beta) so that
  KL(pi*_beta || pi_ref) = k for k in ``KL_LEVELS``, along T (1..5 at V = 3) and V (2..6 at
  T = 3): T and V vary at a fixed KL. A level above the instance's largest reachable KL
  (-log pi_ref(argmax r), beta -> 0) is recorded as infeasible, not measured;
- ``clip``: y ~ mu_s (``studies.moments.problem``) for s in ``CLIP_STALENESS`` and
  ``weight_clip`` = c in ``CLIPS`` on every estimator that weights by pi/mu (``CLIP_RUNS``), beside
  every estimator unclipped (and ``studies.moments.OFF_POLICY_VARIANTS``); MSE(n) for any n
  follows from |bias|^2 and the trace.

Only |bias|^2, trace Cov[g] and |grad KL|^2 are stored (no eigen-decomposition; floats to 9
significant digits), one JSON file per instance seed (every sweep point) under ``--out/cells``; an
existing file is skipped, so the command resumes. One seed costs about a second of one CPU core; the
files hold no timings, so a rerun reproduces them byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import kl_estimators
from agents.cli.run_dir import atomic_write
from studies.moments import Cell, problem
from studies.moments_grid import OFF_POLICY_VARIANTS, label, unbiased
from studies.moments_instances_grid import BETA, CLIP_RUNS, CLIP_STALENESS, CLIPS, KL_LEVELS, N_SEEDS
from studies.moments_exact import Problem, per_sequence_terms
from studies.tabular_model import Instance, make_instance, sequence_logprobs



@dataclass(frozen=True)
class Point:
    """One sweep point of one instance: the ``studies.moments.Cell`` measured and its file name."""

    cell: Cell
    name: str
    target_kl: float | None = None


def beta_for_kl(vocab: int, length: int, seed: int, target: float, tol: float = 1e-10) -> float | None:
    """beta with KL(pi*_beta || pi_ref) = ``target`` (relative ``tol``), or None if unreachable.

    KL(pi*_beta || pi_ref) falls monotonically from -log pi_ref(argmax r) (beta -> 0) to 0
    (beta -> inf), so bisection on log beta in [1e-4, 1e4] finds the root where it exists."""

    def kl(beta: float) -> float:
        return kl_optimum_ref(make_instance(vocab, length, beta, seed))

    lo, hi = math.log(1e-4), math.log(1e4)
    if kl(math.exp(lo)) < target or kl(math.exp(hi)) > target:
        return None
    for _ in range(200):
        mid = (lo + hi) / 2
        if kl(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return math.exp((lo + hi) / 2)


def kl_optimum_ref(instance: Instance) -> float:
    """KL(pi*_beta || pi_ref) of ``instance``, exactly."""
    logp = instance.optimum_logprobs()
    ref = sequence_logprobs(instance.space, instance.ref_table)
    return float((logp.exp() * (logp - ref)).sum())


def points(seed: int) -> list[Point]:
    """Every sweep point of instance seed ``seed``."""
    out = [Point(Cell("T", 3, t, BETA, seed), f"T-V3-T{t}-seed{seed}") for t in range(1, 7)]
    out += [Point(Cell("V", v, 3, BETA, seed), f"V-V{v}-T3-seed{seed}") for v in range(2, 7)]
    out += [Point(Cell("beta", 3, 3, b, seed), f"beta-b{b:g}-seed{seed}") for b in (0.1, 0.3, 1.0, 3.0)]
    for level in KL_LEVELS:
        for vocab, length in [(3, t) for t in range(1, 6)] + [(v, 3) for v in range(2, 7) if v != 3]:
            name = f"kl{level:g}-V{vocab}-T{length}-seed{seed}"
            beta = beta_for_kl(vocab, length, seed, level)
            out.append(Point(Cell(f"kl{level:g}", vocab, length, beta if beta is not None else math.nan, seed), name, level))
    for s in CLIP_STALENESS:
        out.append(Point(Cell("clip", 3, 3, BETA, seed, staleness=s), f"clip-s{s:g}-seed{seed}"))
    return out


def runs(point: Point) -> list[tuple[str, dict]]:
    """(estimator, options) measured at ``point``."""
    every = [(name, {}) for name in kl_estimators.ESTIMATORS]
    if point.cell.sweep != "clip":
        return every
    clipped = [(name, {**options, "weight_clip": c}) for c in CLIPS for name, options in CLIP_RUNS]
    return every + list(OFF_POLICY_VARIANTS) + clipped


def moments(prob: Problem, estimator: str, options: dict, grad_kl) -> tuple[float, float]:
    """(|E g - grad KL|^2, trace Cov[g]) by enumeration (as ``studies.moments_exact.exact_moments``)."""
    grads, _ = per_sequence_terms(prob, prob.space.sequences, estimator, **options)
    q = prob.sampler_probs()
    mean = q @ grads
    return float(((mean - grad_kl) ** 2).sum()), float(q @ ((grads - mean) ** 2).sum(-1))


def compute(point: Point) -> dict:
    """The JSON record of one point: the problem's KLs and every run's |bias|^2 and trace."""
    cell = point.cell
    record = {
        "name": point.name, "sweep": cell.sweep, "vocab": cell.vocab, "length": cell.length, "seed": cell.seed,
        "beta": None if math.isnan(cell.beta) else cell.beta, "target_kl": point.target_kl, "staleness": cell.staleness,
    }  # fmt: skip
    if record["beta"] is None:
        return {**record, "feasible": False}
    prob = problem(cell)
    grad_kl = prob.grad_kl()
    off = prob.behaviour_table is not None
    measured, unbiased_labels = {}, []
    for estimator, options in runs(point):
        name = label(estimator, options)
        measured[name] = list(moments(prob, estimator, options, grad_kl))
        if unbiased(estimator, options, off):
            unbiased_labels.append(name)
    return {
        **record,
        "feasible": True,
        "kl_pi_ref": prob.kl(prob.table, prob.ref_table),
        "kl_mu_pi": prob.kl(prob.behaviour_table, prob.table) if off else 0.0,
        "grad_kl_sq": float(grad_kl @ grad_kl),
        "estimators": measured,  # label: [|bias|^2, trace Cov[g]]
        "unbiased": unbiased_labels,
    }


def _rounded(x):
    """Floats to 9 significant digits (far below any difference the report reads), recursively."""
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def run(out: Path, seeds: list[int]) -> int:
    """Compute every missing instance of ``seeds`` (one file each); the number computed."""
    done = 0
    for seed in seeds:
        path = out / "cells" / f"seed{seed}.json"
        if path.is_file():
            continue
        records = [_rounded(compute(point)) for point in points(seed)]
        atomic_write(path, lambda tmp, r=records: tmp.write_text(json.dumps(r) + "\n"))
        done += 1
        print(f"seed {seed}: done", flush=True)
    return done


def _seeds(text: str) -> list[int]:
    """``0-11`` or ``0,3,5``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.moments_instances", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/moments_instances"), help="results folder")
    parser.add_argument("--seeds", type=_seeds, default=list(range(N_SEEDS)), help="instance seeds, e.g. 0-23 or 0,5")
    parser.add_argument("--report", action="store_true", help="only regenerate the report")
    options = parser.parse_args(argv)
    from studies.moments_instances_report import write_report

    if not options.report:
        run(options.out, options.seeds)
    write_report(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
