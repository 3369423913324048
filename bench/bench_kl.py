"""Benchmark the exact per-position KL (``kl_estimators.analytic``) at LM vocab sizes: naive vs chunked.

Each configuration runs in a fresh subprocess. Time is the median wall-clock of a few repeats.
Peak extra memory is the process's peak RSS (``resource.getrusage`` max RSS) minus the peak RSS
after the float32 inputs are allocated and a tiny warm-up call has loaded the kernels, so it
covers every temporary and the gradient output of the measured call. "forward" runs under
``torch.no_grad()`` (e.g. KL for logging/rewards); "fwd+bwd" differentiates the summed KL
w.r.t. the policy logits (reference logits constant), as in training.

    python bench/bench_kl.py            # prints a Markdown table
    python bench/bench_kl.py --small    # tiny sizes, one repeat: the suite's smoke test
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCABS = (49_152, 50_257)
SHAPES = ((16, 48), (64, 48))
CHUNK_SIZES = (None, 256, 64)
PASSES = ("forward", "fwd+bwd")
REPEATS = 3
THREADS = 2


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(vocab: int, batch: int, length: int, chunk_size: int | None, which: str, repeats: int = REPEATS) -> dict:
    """Time one configuration in this (fresh) process and measure its peak extra RSS."""
    import torch

    from kl_estimators import analytic

    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=gen).requires_grad_(which == "fwd+bwd")
    ref_logits = torch.randn(batch, length, vocab, generator=gen)
    tiny = logits[:1, :1].detach().requires_grad_()
    torch.autograd.grad(analytic(tiny, ref_logits[:1, :1], chunk_size=chunk_size).sum(), tiny)
    baseline = _peak_rss_mb()

    def step() -> None:
        if which == "forward":
            with torch.no_grad():
                analytic(logits, ref_logits, chunk_size=chunk_size)
        else:
            kl = analytic(logits, ref_logits, chunk_size=chunk_size)
            torch.autograd.grad(kl.sum(), logits)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_extra_mb": _peak_rss_mb() - baseline}


def main(small: bool = False) -> None:
    vocabs, shapes, repeats = ((50,), ((2, 3),), 1) if small else (VOCABS, SHAPES, REPEATS)
    print(f"analytic KL, float32, {THREADS} threads; median of {repeats}; peak extra = max RSS above inputs\n")
    print("| vocab | B x T | pass | mode | time (s) | peak extra mem (MB) |")
    print("|---:|---:|---|---|---:|---:|")
    for vocab in vocabs:
        for batch, length in shapes:
            for which in PASSES:
                for chunk_size in CHUNK_SIZES:
                    args = [vocab, batch, length, chunk_size, which, repeats]
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(args)],
                        capture_output=True, text=True, check=True,
                    )
                    result = json.loads(out.stdout)
                    mode = "naive" if chunk_size is None else f"chunk {chunk_size}"
                    print(
                        f"| {vocab} | {batch} x {length} | {which} | {mode} | "
                        f"{result['seconds']:.3f} | {result['peak_extra_mb']:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        main(small=sys.argv[1:] == ["--small"])
