"""PPOKL's KV-cached sampling loop against HF ``generate`` for the same amount of work.

All contenders sample ``--n-envs`` continuations of exactly ``--max-new-tokens`` tokens (no EOS
stop) from the same random prompts with the same seed, so they run the same forwards at the same
shapes:

- ``generate``: ``model.generate(do_sample=True, top_k=0, top_p=1, temperature=1)``;
- ``loop``: PPOKL's sampler, ``lmgym.decoding.IncrementalDecoder`` (final hidden states kept, as
  the rollout does for the value head) and ``agents.rollout.categorical.sample_categorical``
  (inverse CDF, one uniform per row: other tokens than ``generate``'s from the same distribution);
- ``loop, multinomial``: the same loop drawing as ``generate`` does (``sample_multinomial``:
  ``torch.multinomial`` of the softmax, the sampler before the inverse CDF): it must draw ``generate``'s tokens, checked every
  round (the header says so, or names the rounds where they differed).

Rounds alternate the contenders in one process (load from other processes hits all alike); the
first round is a warm-up. After timing, one profiled call per contender gives the count of aten
ops and the bytes they allocate: machine-independent, so comparable on a loaded machine (``--top
N`` also prints each call's N costliest ops by self CPU time, which do depend on load). Last, the
draws alone: ``sample_categorical`` and ``sample_multinomial`` on ``[n_envs, V]`` random logits,
alternating, the median of ``--draws`` calls each.

    python bench/bench_sampler.py [--model smollm2-135m] [--n-envs 24] [--prompt-tokens 24] [--max-new-tokens 16] [--rounds 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from agents.rollout.categorical import sample_categorical, sample_multinomial
from lmgym.assets import load_causal_lm
from lmgym.decoding import IncrementalDecoder


def loop(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, draw=lambda z: sample_categorical(z)[0]) -> torch.Tensor:
    """PPOKL's sampling loop without the env: prefill, then one cached forward per token."""
    decoder, tokens = IncrementalDecoder(model, output_hidden=True), []
    out = decoder.prefill(ids, mask)
    for t in range(steps):
        with torch.no_grad():
            tokens.append(draw(out.logits))
        if t + 1 < steps:
            out = decoder.append(tokens[-1])
    return torch.stack(tokens, dim=1)


def generate(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=steps, min_new_tokens=steps, pad_token_id=pad_id, eos_token_id=None)  # fmt: skip
    return out[:, ids.shape[1] :]


def op_profile(fn, top: int = 0) -> tuple[int, int, str]:
    """(aten op calls, bytes allocated by them, the ``top`` ops by self CPU time as a table) of
    one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    averages = prof.key_averages()
    events = [e for e in averages if e.key.startswith("aten::")]
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top) if top else ""
    return sum(e.count for e in events), sum(max(e.self_cpu_memory_usage, 0) for e in events), table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-envs", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all contenders (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--draws", type=int, default=50, help="calls of each draw alone")
    parser.add_argument("--top", type=int, default=0, help="also print each contender's N costliest ops (self CPU time) in its profiled call")
    options = parser.parse_args(argv)
    from agents.device import device_error

    if device_error(options.device):
        parser.exit(2, f"{device_error(options.device)}\n")
    if options.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (the first is a warm-up)")
    torch.set_num_threads(options.threads)
    model, tokenizer = load_causal_lm(options.model)
    model.eval().to(options.device)
    g = torch.Generator().manual_seed(options.seed)
    n, p, steps = options.n_envs, options.prompt_tokens, options.max_new_tokens
    ids = torch.randint(0, model.config.vocab_size, (n, p), generator=g)
    mask = torch.ones(n, p, dtype=torch.long)
    lengths = torch.randint(1, p + 1, (n,), generator=g)  # left padding: row b keeps its last lengths[b] tokens
    mask[torch.arange(p) < (p - lengths)[:, None]] = 0
    ids[mask == 0] = tokenizer.pad_token_id
    ids, mask = ids.to(options.device), mask.to(options.device)
    sync = torch.cuda.synchronize if torch.device(options.device).type == "cuda" else (lambda: None)
    contenders = {
        "generate": lambda: generate(model, ids, mask, steps, tokenizer.pad_token_id),
        "loop": lambda: loop(model, ids, mask, steps),
        "loop, multinomial": lambda: loop(model, ids, mask, steps, lambda z: sample_multinomial(z)[0]),
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    differing: list[int] = []  # rounds in which the multinomial loop drew other tokens than generate
    for round_ in range(options.rounds):
        tokens = {}
        for name, fn in contenders.items():
            gc.collect()
            torch.manual_seed(options.seed + round_)
            sync()
            start = time.perf_counter()
            tokens[name] = fn()
            sync()
            seconds[name].append(time.perf_counter() - start)
        if not torch.equal(tokens["loop, multinomial"], tokens["generate"]):
            differing.append(round_)
    profiles = {name: op_profile(fn, options.top) for name, fn in contenders.items()}
    token_note = ("loop, multinomial drew generate's tokens in every round" if not differing
                  else f"loop, multinomial drew DIFFERENT tokens from generate in rounds {differing}")
    print(f"\n{options.model} on {options.device}: {n} sequences, prompts <= {p} tokens (left-padded), {steps} new tokens; torch threads "
          f"{torch.get_num_threads()}; {token_note}; medians of {options.rounds - 1} alternating rounds after 1 warm-up\n")
    print("| contender | median (s) | / generate | per round (s) | aten ops | MiB allocated |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    base = statistics.median(seconds["generate"][1:])
    for name, times in seconds.items():
        measured = times[1:]
        ops, allocated, _ = profiles[name]
        print(f"| {name} | {statistics.median(measured):.3f} | {statistics.median(measured) / base:.2f} | "
              f"{', '.join(f'{t:.3f}' for t in measured)} | {ops} | {allocated / 2**20:.0f} |", flush=True)
    for name, (_, _, table) in profiles.items():
        if table:
            print(f"\n{name}: the {options.top} costliest ops of its profiled call\n{table}")
    draws = draw_seconds(torch.randn(n, model.config.vocab_size, generator=g).mul_(4).to(options.device), options.draws, sync)
    print(f"\nthe draw alone, [{n}, {model.config.vocab_size}] logits, median of {options.draws} calls: "
          + ", ".join(f"{name} {1e3 * statistics.median(times):.2f} ms" for name, times in draws.items()))


def draw_seconds(logits: torch.Tensor, calls: int, sync) -> dict[str, list[float]]:
    """Seconds per call of each draw on ``logits``, the two alternating."""
    seconds: dict[str, list[float]] = {"sample_categorical": [], "sample_multinomial": []}
    draws = {"sample_categorical": sample_categorical, "sample_multinomial": sample_multinomial}
    for _ in range(calls + 1):  # the first call of each is a warm-up
        for name, draw in draws.items():
            sync()
            start = time.perf_counter()
            draw(logits)
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: times[1:] for name, times in seconds.items()}


if __name__ == "__main__":
    main()
