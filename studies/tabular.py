"""Tabular study: which KL-gradient configurations reach pi*(y) ∝ pi_ref(y) exp(r(y)/beta)?

    python -m studies.tabular              # run what is missing, then write the report
    python -m studies.tabular --report     # only regenerate table.md, the CSVs and the plots

(a) exact expected-gradient dynamics on every instance of the grid (vocabulary x length x beta),
(b) sampled minibatch dynamics on a few instances, over several seeds. One JSON file per
(instance, configuration[, seed]) under ``--out``; a cell whose file exists is skipped, so a
killed run resumes where it stopped. Files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from studies.cli_checks import FolderLock, check_out, number, number_list, run_cli
from studies.tabular_configs import Config, all_configs
from studies.tabular_dynamics import run_exact, run_sampled
from studies.tabular_model import make_instance
from studies.tabular_report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/tabular"), help="results folder")
    p.add_argument("--report", action="store_true", help="only regenerate the report from the result files")
    p.add_argument("--vocab", type=number_list(int, "--vocab", 2), default=[2, 3, 5], help="vocabulary sizes (exact part)")
    p.add_argument("--length", type=number_list(int, "--length", 1), default=[1, 2, 3, 4], help="sequence lengths T (exact part)")
    p.add_argument("--beta", type=number_list(float, "--beta", 0.0, open_low=True), default=[0.5, 1.0, 2.0], help="KL coefficients (exact part)")
    p.add_argument("--max-sequences", type=int, default=100, help="exact part: skip instances with V^T above this")
    p.add_argument("--instance-seed", type=number(int, "--instance-seed", 0), default=0, help="seed of pi_ref and r for every instance")
    p.add_argument("--eta", type=number(float, "--eta", 0.0, open_low=True), default=1.0, help="exact part: step size on J/beta (divided by K)")
    p.add_argument("--max-steps", type=int, default=1500, help="exact part: step cap")
    p.add_argument("--tol", type=number(float, "--tol", 0.0, open_low=True), default=1e-6, help="exact part: fixed point when max |grad| < tol")
    p.add_argument("--steps-per-batch", type=int, default=4, help="K of the off-policy configurations")
    p.add_argument(
        "--sampled",
        type=str,
        default="3x3@1",
        help="sampled part: comma-separated VxT@beta instances ('' to skip)",
    )
    p.add_argument("--seeds", type=int, default=5, help="sampled part: seeds per configuration")
    p.add_argument("--batch-size", type=int, default=32, help="sampled part: sequences per batch")
    p.add_argument("--sgd-steps", type=int, default=1500, help="sampled part: gradient steps")
    p.add_argument("--sgd-eta", type=number(float, "--sgd-eta", 0.0, open_low=True), default=0.2, help="sampled part: SGD step size on J/beta")
    p.add_argument("--configs", type=lambda s: s.split(","), default=None, help="subset of configuration names")
    args = p.parse_args(argv)
    try:
        check_out(args.out)
        for vocab, length, beta in _sampled_instances(args.sampled):
            if vocab < 2 or length < 1 or not (math.isfinite(beta) and beta > 0):
                raise ValueError(f"--sampled: {vocab}x{length}@{beta} needs V >= 2, T >= 1 and a finite beta > 0")
    except ValueError as error:
        p.error(str(error))
    for name in ("max_sequences", "max_steps", "steps_per_batch", "seeds", "batch_size", "sgd_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _sampled_instances(spec: str) -> list[tuple[int, int, float]]:
    """'3x3@1,5x4@1' -> [(3, 3, 1.0), (5, 4, 1.0)]."""
    out = []
    for item in filter(None, spec.split(",")):
        shape, _, beta = item.partition("@")
        vocab, _, length = shape.partition("x")
        try:
            out.append((int(vocab), int(length), float(beta)))
        except ValueError:
            raise ValueError(f"--sampled: expected VxT@beta items like 3x3@1, got {item!r}") from None
    return out


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("+", "-plus-")


def _compact_trajectory(payload: dict) -> dict:
    """``payload`` with its trajectory's metrics rounded to 6 significant digits (the end point is kept exact)."""
    rounded = [{k: v if isinstance(v, int) else float(f"{v:.6g}") for k, v in p.items()} for p in payload["trajectory"]]
    return {**payload, "trajectory": rounded}


def _write_json(path: Path, payload: dict) -> None:
    """Atomic compact write: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_compact_trajectory(payload), separators=(",", ":")))
    tmp.replace(path)


def _selected(args: argparse.Namespace) -> list[Config]:
    configs = all_configs(args.steps_per_batch)
    if args.configs is None:
        return list(configs)
    known = {c.name: c for c in configs}
    unknown = [n for n in args.configs if n not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(known)}")
    return [known[n] for n in args.configs]


def _machine() -> str:
    """The CPU model (``lscpu``'s "Model name", read from /proc/cpuinfo), else the platform."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cell(config: Config, instance, extra: dict) -> dict:
    return {
        "config": config.name,
        "family": config.family,
        "steps_per_batch": config.steps_per_batch,
        "instance": instance.name,
        "vocab": instance.space.vocab,
        "length": instance.space.length,
        "beta": instance.beta,
        "instance_seed": instance.seed,
        "machine": _machine(),
        **extra,
    }


def run_study(args: argparse.Namespace) -> int:
    """Run every missing cell; returns how many were run."""
    configs, done = _selected(args), 0
    for vocab in args.vocab:
        for length in args.length:
            if vocab**length > args.max_sequences:
                continue
            for beta in args.beta:
                instance = make_instance(vocab, length, beta, args.instance_seed)
                for config in configs:
                    path = args.out / "exact" / instance.name / f"{_slug(config.name)}.json"
                    if path.exists():
                        continue
                    start = time.perf_counter()
                    eta = args.eta / config.steps_per_batch
                    result = run_exact(config, instance, eta, args.max_steps, args.tol)
                    settings = {"eta": eta, "max_steps": args.max_steps, "tol": args.tol}
                    _write_json(path, _cell(config, instance, {**settings, **result, "seconds": time.perf_counter() - start}))
                    done += 1
                    print(f"exact {instance.name} {config.name}: KL(pi||pi*)={result['kl_to_opt']:.3g}", flush=True)
    for vocab, length, beta in _sampled_instances(args.sampled):
        instance = make_instance(vocab, length, beta, args.instance_seed)
        for config in configs:
            for seed in range(args.seeds):
                path = args.out / "sampled" / instance.name / _slug(config.name) / f"seed{seed}.json"
                if path.exists():
                    continue
                start = time.perf_counter()
                result = run_sampled(config, instance, args.sgd_eta, args.sgd_steps, args.batch_size, seed)
                settings = {"eta": args.sgd_eta, "batch_size": args.batch_size, "seed": seed}
                _write_json(path, _cell(config, instance, {**settings, **result, "seconds": time.perf_counter() - start}))
                done += 1
        print(f"sampled {instance.name}: done", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if not args.report:
        _selected(args)  # an unknown --configs name exits before anything is created

    def body() -> int:
        with FolderLock(args.out):
            if not args.report:
                start = time.perf_counter()
                ran = run_study(args)
                print(f"{ran} cells run in {time.perf_counter() - start:.0f} s on {_machine()}")
            write_report(args.out)
        print(f"report: {args.out / 'table.md'}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
