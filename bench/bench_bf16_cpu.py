"""What bfloat16 autocast costs against float32 on this CPU: a forward + backward and ``generate``.

A CPU without native bfloat16 (no ``avx512_bf16`` / ``amx_bf16`` flag) emulates bfloat16's
matrix products, and ``bench/bench_trl.py --precision bf16`` then times the emulation. This
script times, alternating in one process after a warm-up, with ``--threads`` torch threads:

- ``forward + backward``: the causal LM over ``--batch`` x ``--length`` random tokens, the loss
  mean(logsumexp(logits)), under ``torch.autocast("cpu", bfloat16)`` or in float32;
- ``generate``: ``--batch`` rows of 16 prompt tokens continued by ``--new-tokens`` sampled tokens.

    python bench/bench_bf16_cpu.py [--model smollm2-135m] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agents.device import cpu_has_native_bf16
from lmgym.assets import load_causal_lm


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=8)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    lm = load_causal_lm(options.model)[0]
    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (options.batch, options.length), generator=torch.Generator().manual_seed(0))
    pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = lm(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()

    def generate(bf16: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lm.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=options.new_tokens,
                        min_new_tokens=options.new_tokens,
                        do_sample=True, pad_token_id=pad)

    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(options.rounds + 1):
        for name, fn in (("forward + backward", step), ("generate", generate)):
            for precision in ("float32", "bfloat16"):
                seconds = timed(lambda: fn(precision == "bfloat16"))
                if round_:
                    times.setdefault((name, precision), []).append(seconds)
    print(f"\n{options.model}, {options.batch} x {options.length} tokens (generate: {options.new_tokens} new), torch threads "
          f"{torch.get_num_threads()}; CPU {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}; "
          f"{options.rounds} alternating rounds after a warm-up\n")
    print("| work | float32 (s) | bfloat16 autocast (s) | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for name in ("forward + backward", "generate"):
        fp32, bf16 = times[(name, "float32")], times[(name, "bfloat16")]
        per_round = ", ".join(f"{b / f:.1f}" for f, b in zip(fp32, bf16))
        print(f"| {name} | {', '.join(f'{t:.2f}' for t in fp32)} | {', '.join(f'{t:.2f}' for t in bf16)} | "
              f"{statistics.median(b / f for f, b in zip(fp32, bf16)):.1f} ({per_round}) |")


if __name__ == "__main__":
    main()
