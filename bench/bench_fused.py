"""Fused vs unfused exact KL from hidden states: peak memory and time of value + gradient.

Both paths start from the same inputs, the policy's and the reference's final hidden states
[B, T, d] and output-layer weights [V, d] (float32), and return the same things: KL_t and
log pi(y_t) at every position, differentiated (their sum) with respect to the policy's hidden
states and weight.

- ``unfused`` (today's path): materialise both models' [B, T, V] logits, ``kl_estimators.analytic``
  with ``chunk_size=64`` (PPOKL's default) and a log-softmax gather.
- ``fused``: ``kl_estimators.fused_kl`` on ``LinearLogits``, chunk size automatic;
- ``fused-bf16``: the same with ``product_dtype=torch.bfloat16`` (the output layer's products in
  bfloat16, the softmax, KL and gradient terms in float32; the inputs stay float32);
- ``trl``: TRL 1.16's ``ChunkedDivergenceFunction`` with ``beta=1.0`` (KL(pi || pi_ref) from both
  models' hidden states and heads, tiles of 4,096 tokens x 32,768 vocabulary entries, its
  pure-torch path off CUDA); it returns no token log-probabilities, so compare it with
  ``--kl-only`` (every mode's loss is then the KL alone). tests/test_kl_fused_peers.py checks
  that it and ``fused_kl`` compute the same value and gradient. Liger-Kernel's
  ``LigerFusedLinearJSD`` is Triton-only (no CPU path), so it is not a mode.

Each case runs in a fresh subprocess. "peak extra" is the process's peak RSS during the measured
calls (the kernel's high-water mark, reset through /proc/self/clear_refs after the inputs were
allocated and a tiny warm-up call loaded the kernels) minus the RSS before them and minus the
bytes of the gradients themselves (policy hidden states and weight): the temporaries of the
computation. It does not depend on the machine's load. Time is the median wall-clock of ``--repeats`` calls
(record it on an idle machine). A case whose predicted unfused need (six [B, T, V] float32
tensors: both logits, the log-softmax, its gradient and two transient copies) exceeds
``--max-gb`` is reported as not fitting instead of being run. Matmul FLOPs per position:
unfused 4 x 2Vd (two forward products, two backward), fused 6 x 2Vd (the two logits are
recomputed in backward).

    python bench/bench_fused.py                                  # the docs' grid, 1 thread
    python bench/bench_fused.py --vocabs 151936 --dims 896 --lengths 1024 --modes fused --repeats 1
    python bench/bench_fused.py --modes fused trl --kl-only --lengths 256 512 1024   # against TRL's kernel
    python bench/bench_fused.py --small                          # seconds: the suite's smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("unfused", "fused", "fused-bf16", "trl")
UNFUSED_CHUNK = 64
UNFUSED_TENSORS = 6  # [B, T, V] float32 tensors alive at the unfused peak (see the docstring)


def _status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def worker(mode: str, vocab: int, dim: int, batch: int, length: int, repeats: int, threads: int, kl_only: bool = False,
           device: str = "cpu") -> dict:
    """Run one case in this (fresh) process: peak extra bytes, median seconds, a checksum. On CUDA
    the peak is ``torch.cuda.max_memory_allocated`` beyond the inputs, and each call is synchronised."""
    import torch

    from kl_estimators import LinearLogits, analytic, fused_kl
    from lmgym.task import log_prob

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hp, hq = torch.randn(batch, length, dim, generator=g), torch.randn(batch, length, dim, generator=g)
    wp, wq = torch.randn(vocab, dim, generator=g).mul_(dim**-0.5), torch.randn(vocab, dim, generator=g).mul_(dim**-0.5)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    hp, hq, wp, wq, tokens, mask = (x.to(device) for x in (hp, hq, wp, wq, tokens, mask))
    cuda = torch.device(device).type == "cuda"
    hp.requires_grad_(True)
    wp.requires_grad_(True)

    def value_and_gradient(hp, tokens, mask, hq) -> float:
        if mode.startswith("fused"):
            product_dtype = torch.bfloat16 if mode == "fused-bf16" else None
            policy, reference = LinearLogits(hp, wp, product_dtype=product_dtype), LinearLogits(hq, wq, product_dtype=product_dtype)
            out = fused_kl(policy, reference, None if kl_only else tokens, mask)
            loss = out.kl.sum() + (0 if kl_only else out.logprobs.sum())
        elif mode == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            kl, _ = ChunkedDivergenceFunction.apply(hp.reshape(-1, dim), wp, None, hq.reshape(-1, dim), wq, None, 1.0)
            loss = (kl.view(mask.shape) * mask).sum()
        else:
            zp = hp @ wp.T
            with torch.no_grad():
                zq = hq @ wq.T
            kl = analytic(zp, zq, mask=mask, chunk_size=UNFUSED_CHUNK)
            logp = log_prob(zp, tokens)
            loss = kl.sum() + (0 if kl_only else logp.sum())
        grads = torch.autograd.grad(loss, (hp, wp))
        return float(loss) + float(sum(grad.sum() for grad in grads))

    value_and_gradient(hp[:1, :1], tokens[:1, :1], mask[:1, :1], hq[:1, :1])  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _reset_peak_rss()
    times, checksum = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        checksum = value_and_gradient(hp, tokens, mask, hq)  # float(): synchronises on CUDA
        times.append(time.perf_counter() - start)
    gradient_bytes = (hp.numel() + wp.numel()) * 4
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    return {
        "peak_extra_bytes": peak - baseline - gradient_bytes,
        "seconds": statistics.median(times),
        "min_seconds": min(times),
        "max_seconds": max(times),
        "all_seconds": times,
        "checksum": checksum,
    }


def matmul_flops(mode: str, vocab: int, dim: int, positions: int) -> int:
    """unfused: 2 forward and 2 gradient products; fused, fused-bf16 and trl: 2 forward products,
    both logits recomputed in backward (2), and 2 gradient products."""
    return (4 if mode == "unfused" else 6) * 2 * vocab * dim * positions


def unfused_need_bytes(vocab: int, batch: int, length: int) -> int:
    return UNFUSED_TENSORS * batch * length * vocab * 4


def run_case(mode: str, vocab: int, dim: int, batch: int, length: int, repeats: int, threads: int, kl_only: bool = False,
             device: str = "cpu") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, __file__, "--worker", json.dumps([mode, vocab, dim, batch, length, repeats, threads, kl_only, device])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49_152, 151_936])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 896])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[48, 128, 256, 512, 1024])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["unfused", "fused"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak: torch.cuda.max_memory_allocated)")
    parser.add_argument("--kl-only", action="store_true", help="differentiate the KL alone (no token log-probs): needed next to trl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip unfused cases predicted to need more")
    parser.add_argument("--small", action="store_true", help="tiny sizes (V 300, d 16, B x T 2 x 3), 1 repeat: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    options = parser.parse_args(argv)
    if options.device != "cpu":
        from agents.device import device_error

        if device_error(options.device):
            parser.exit(2, f"{device_error(options.device)}\n")
    if "trl" in options.modes and not options.kl_only:
        parser.exit(2, "--modes trl needs --kl-only (TRL's kernel returns no token log-probabilities)\n")
    if options.small:
        options.vocabs, options.dims, options.batch, options.lengths, options.repeats = [300], [16], 2, [3], 1
    what = "KL" if options.kl_only else "KL + log pi(y)"
    print(f"{', '.join(options.modes)}: {what} value + gradient, float32 inputs, {options.device}, {options.threads} thread(s), median of {options.repeats}; "
          f"peak extra = peak RSS beyond inputs and gradients\n")
    print("| V | d | B x T | mode | peak extra (MiB) | time (s), median (min-max) | matmul GFLOP | per call (s) |")
    print("|---:|---:|---:|---|---:|---|---:|---|")
    rows = []
    for vocab in options.vocabs:
        for dim in options.dims:
            for length in options.lengths:
                for mode in options.modes:
                    flops = matmul_flops(mode, vocab, dim, options.batch * length) / 1e9
                    need = unfused_need_bytes(vocab, options.batch, length)
                    shape = f"{options.batch} x {length}"
                    if mode == "unfused" and need > options.max_gb * 2**30:
                        rows.append({"vocab": vocab, "dim": dim, "batch": options.batch, "length": length, "mode": mode, "fits": False})
                        print(f"| {vocab} | {dim} | {shape} | {mode} | does not fit: needs ~{need / 2**30:.0f} GiB | - | {flops:.0f} | - |", flush=True)
                        continue
                    result = run_case(mode, vocab, dim, options.batch, length, options.repeats, options.threads, options.kl_only, options.device)
                    rows.append({"vocab": vocab, "dim": dim, "batch": options.batch, "length": length, "mode": mode, "fits": True, **result})
                    print(f"| {vocab} | {dim} | {shape} | {mode} | {result['peak_extra_bytes'] / 2**20:.0f} | "
                          f"{result['seconds']:.2f} ({result['min_seconds']:.2f}-{result['max_seconds']:.2f}) | {flops:.0f} | "
                          f"{', '.join(f'{t:.2f}' for t in result['all_seconds'])} |", flush=True)
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        main()
