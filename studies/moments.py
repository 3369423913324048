"""``python -m studies.moments``: exact bias, variance and MSE of every KL-gradient estimator, tabular.

    python -m studies.moments             # compute what is missing, then write the report
    python -m studies.moments --report    # only regenerate results/moments/table.md and the plots

Every cell is one tabular problem (``studies.tabular_model.make_instance``: V, T, beta, seed) at
pi = pi*_beta, the policy the KL-regularised objective converges to (so KL(pi || pi_ref) grows as
beta falls), and every estimator of ``kl_estimators.ESTIMATOR_INFO`` (plus importance-weighted
variants off-policy) gets its exact moments (``studies.moments_exact``). Sweeps:

- ``T``: length 1..6 at V = 3, beta = 0.3; ``V``: vocabulary 2..6 at T = 3, beta = 0.3;
  ``beta``: 0.1, 0.3, 1, 3 at V = T = 3 (on-policy, y ~ pi);
- ``stale``: y ~ mu_s, an earlier policy on the way from pi_ref to pi*: mu_s's logits are
  log pi_ref + (1 - s) log W (pi*'s are log pi_ref + log W, ``Instance.optimum_table``), so
  s = 0 is pi itself and s = 1 is pi_ref (offline data); KL(mu || pi) is recorded;
- ``clip``: at s = 1 (pi_ref data, where pi/mu reaches 5-11 on the three seeds), ``weight_clip`` = c on the estimators that weight by pi/mu.

One JSON file per (sweep point, seed) under ``--out/cells``; a cell whose file exists is skipped,
so the command resumes. Files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import kl_estimators
from agents.cli.run_dir import atomic_write
from studies.cli_checks import FolderLock, check_out, number_list, run_cli
from studies.moments_exact import Problem, exact_moments
from studies.moments_grid import BASE, CLIP_STALENESS, CLIPPED, CLIPS, OFF_POLICY_VARIANTS, SEEDS, STALENESS, label, unbiased
from studies.tabular_model import make_instance


@dataclass(frozen=True)
class Cell:
    """One problem and regime: sweep name, instance parameters, staleness s (None: on-policy), clip."""

    sweep: str
    vocab: int
    length: int
    beta: float
    seed: int
    staleness: float | None = None
    clip: float | None = None

    @property
    def name(self) -> str:
        name = f"{self.sweep}-V{self.vocab}-T{self.length}-b{self.beta:g}"
        if self.staleness is not None:
            name += f"-s{self.staleness:g}"
        if self.clip is not None:
            name += f"-c{self.clip:g}"
        return f"{name}-seed{self.seed}"


def all_cells(seeds: tuple[int, ...] = SEEDS) -> list[Cell]:
    """Every cell of the study, seed-major within each sweep."""
    v, t, b = BASE["vocab"], BASE["length"], BASE["beta"]
    cells = []
    for seed in seeds:
        cells += [Cell("T", v, length, b, seed) for length in range(1, 7)]
        cells += [Cell("V", vocab, t, b, seed) for vocab in range(2, 7)]
        cells += [Cell("beta", v, t, beta, seed) for beta in (0.1, 0.3, 1.0, 3.0)]
        cells += [Cell("stale", v, t, b, seed, staleness=s) for s in STALENESS]
        cells += [Cell("clip", v, t, b, seed, staleness=CLIP_STALENESS, clip=c) for c in CLIPS]
    return cells


def problem(cell: Cell) -> Problem:
    """pi = pi*_beta of the cell's instance; off-policy, mu_s (module docstring)."""
    instance = make_instance(cell.vocab, cell.length, cell.beta, cell.seed)
    table = instance.optimum_table()
    behaviour = None
    if cell.staleness is not None:
        ref_logp = instance.ref_table.log_softmax(-1)
        behaviour = ref_logp + (1.0 - cell.staleness) * (table - ref_logp)
    return Problem(instance.space, table, instance.ref_table, behaviour)


def estimator_runs(cell: Cell) -> list[tuple[str, dict]]:
    """(estimator, options) measured in ``cell``."""
    if cell.clip is not None:
        sequence_weighted = [(name, options) for name, options in OFF_POLICY_VARIANTS if options["importance"] == "sequence"]
        return [(name, {"weight_clip": cell.clip}) for name in CLIPPED] + [
            (name, {**options, "weight_clip": cell.clip}) for name, options in sequence_weighted
        ]
    runs = [(name, {}) for name in kl_estimators.ESTIMATORS]
    return runs + (list(OFF_POLICY_VARIANTS) if cell.staleness is not None else [])


def compute_cell(cell: Cell) -> dict:
    """The exact moments of every estimator in ``cell``, as a JSON-ready dict."""
    start = time.perf_counter()
    prob = problem(cell)
    grad_kl = prob.grad_kl()
    off = prob.behaviour_table is not None
    rows = []
    for estimator, options in estimator_runs(cell):
        m = exact_moments(prob, estimator, **options)
        rows.append({
            "estimator": estimator,
            "options": options,
            "label": label(estimator, options),
            "unbiased": unbiased(estimator, options, off),
            "bias_sq": m.bias_sq,
            "trace": m.trace,
            "top_eigenvalue": m.top_eigenvalue,
            "cosine_to_grad_kl": float(m.mean @ grad_kl / (m.mean.norm() * grad_kl.norm()).clamp_min(1e-300)),
            "value_bias": m.value_bias,
            "value_variance": m.value_variance,
        })
    return {
        "cell": cell.name,
        "sweep": cell.sweep,
        "vocab": cell.vocab,
        "length": cell.length,
        "beta": cell.beta,
        "seed": cell.seed,
        "staleness": cell.staleness,
        "clip": cell.clip,
        "off_policy": off,
        "n_sequences": prob.space.n_sequences,
        "n_params": prob.table.numel(),
        "kl_pi_ref": prob.kl(prob.table, prob.ref_table),
        "kl_mu_pi": prob.kl(prob.behaviour_table, prob.table) if off else 0.0,
        "grad_kl_sq": float(grad_kl @ grad_kl),
        "seconds": time.perf_counter() - start,
        "estimators": rows,
    }


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside ``path``, renamed over it."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def run(out: Path, seeds: tuple[int, ...]) -> int:
    """Compute every missing cell; the number computed."""
    done = 0
    for cell in all_cells(seeds):
        path = out / "cells" / f"{cell.name}.json"
        if path.is_file():
            continue
        write_json(path, compute_cell(cell))
        done += 1
        print(f"{cell.name}: done", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.moments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/moments"), help="results folder")
    parser.add_argument("--seeds", type=lambda s: tuple(number_list(int, "--seeds", 0)(s)), default=SEEDS, help="instance seeds")
    parser.add_argument("--report", action="store_true", help="only regenerate the report")
    options = parser.parse_args(argv)
    try:
        check_out(options.out)
    except ValueError as error:
        parser.error(str(error))
    from studies.moments_report import write_report

    def body() -> int:
        with FolderLock(options.out):
            if not options.report:
                run(options.out, options.seeds)
            write_report(options.out)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
