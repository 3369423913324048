"""PPOKL's iteration under glibc's default allocator settings and with freed memory kept in the process.

glibc serves a block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back to the kernel when freed, so every such block is page-faulted in again when it is next made.
A vocabulary-by-width tensor (SmolLM2: 49,152 x 576 float32, 113 MB; the tied embedding's dense
gradient, the output layer's weight gradient, their sum) is such a block, made several times per
minibatch. ``retain`` calls ``mallopt(M_MMAP_MAX, 0)`` (no block is mmapped: all come from the
heap) and ``mallopt(M_TRIM_THRESHOLD, INT_MAX)`` (freed memory is not handed back), the settings
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` give a whole process; ``default`` restores
glibc's defaults (65,536 mmaps, a 128 KiB trim threshold). Big blocks made after the switch back
are mmapped again; what the heap already holds stays.

Each round runs one iteration (rollout + update) under each setting in ABBA order, in one process;
it prints each iteration's seconds and minor page faults (``getrusage``), the medians and the
paired ratios retain / default. Linux with glibc only.

    python bench/bench_malloc.py [--config configs/demo.yaml] [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time

import torch

from profile_iteration import learner

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
GLIBC_DEFAULTS = {M_MMAP_MAX: 65_536, M_TRIM_THRESHOLD: 128 * 1024}
RETAINED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}


def set_malloc(settings: dict[int, int]) -> None:
    """Apply glibc ``mallopt`` settings; SystemExit where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as error:
        raise SystemExit(f"glibc's mallopt is not available here ({error}): this benchmark needs Linux with glibc") from None
    for option, value in settings.items():
        if mallopt(option, value) != 1:
            raise SystemExit(f"mallopt({option}, {value}) failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=8, help="pairs of iterations, after one warm-up iteration")
    parser.add_argument("--threads", type=int, default=1)
    options, run_flags = parser.parse_known_args(argv)
    model, callback = learner(options.config, options.threads, run_flags)

    def iteration() -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        model.train()
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    iteration()
    seconds: dict[str, list[float]] = {"default": [], "retain": []}
    print(f"{options.config}, torch threads {torch.get_num_threads()}, {options.rounds} pairs (ABBA) after 1 warm-up\n")
    print("| round | setting | iteration (s) | minor page faults |\n|---:|---|---:|---:|")
    for round_ in range(options.rounds):
        order = ("default", "retain") if round_ % 2 == 0 else ("retain", "default")
        for name in order:
            set_malloc(RETAINED if name == "retain" else GLIBC_DEFAULTS)
            took, faults = iteration()
            seconds[name].append(took)
            print(f"| {round_ + 1} | {name} | {took:.2f} | {faults:,} |", flush=True)
    set_malloc(GLIBC_DEFAULTS)
    ratios = [r / d for r, d in zip(seconds["retain"], seconds["default"], strict=True)]
    print(f"\nmedian iteration: default {statistics.median(seconds['default']):.2f} s, retain {statistics.median(seconds['retain']):.2f} s; "
          f"paired retain / default: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
