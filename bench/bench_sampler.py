"""PPOKL's KV-cached sampling loop against HF ``generate`` for the same tokens.

All contenders sample ``--n-envs`` continuations of exactly ``--max-new-tokens`` tokens (no EOS
stop) from the same random prompts with the same seed, so they draw the same tokens (checked
every round; the header says so, or names the rounds where they differed) and do the same
model work:

- ``generate``: ``model.generate(do_sample=True, top_k=0, top_p=1, temperature=1)``;
- ``loop``: PPOKL's sampler, ``lmgym.decoding.IncrementalDecoder`` (final hidden states kept, as
  the rollout does for the value head) and ``agents.rollout.categorical.sample_categorical``;
- ``loop, Categorical``: the same loop drawing through ``torch.distributions.Categorical`` (the
  sampler before ``sample_categorical``).

Rounds alternate the contenders in one process (load from other processes hits all alike); the
first round is a warm-up. After timing, one profiled call per contender gives the count of aten
ops and the bytes they allocate: machine-independent, so comparable on a loaded machine.

    python bench/bench_sampler.py [--model smollm2-135m] [--n-envs 24] [--prompt-tokens 24] [--max-new-tokens 16] [--rounds 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from agents.rollout.categorical import sample_categorical
from lmgym.assets import load_causal_lm
from lmgym.decoding import IncrementalDecoder


def categorical_draw(logits: torch.Tensor) -> torch.Tensor:
    dist = torch.distributions.Categorical(logits=logits)
    actions = dist.sample()
    dist.log_prob(actions)
    return actions


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


def op_profile(fn) -> tuple[int, int]:
    """(aten op calls, bytes allocated by them) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return sum(e.count for e in events), sum(max(e.self_cpu_memory_usage, 0) for e in events)


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
        "loop, Categorical": lambda: loop(model, ids, mask, steps, categorical_draw),
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    differing: list[int] = []  # rounds in which some contender drew other tokens than generate
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
        if not all(torch.equal(t, tokens["generate"]) for t in tokens.values()):
            differing.append(round_)
    profiles = {name: op_profile(fn) for name, fn in contenders.items()}
    print(f"\n{options.model} on {options.device}: {n} sequences, prompts <= {p} tokens (left-padded), {steps} new tokens; torch threads "
          f"{torch.get_num_threads()}; {'same tokens in every round' if not differing else f'DIFFERENT tokens in rounds {differing}'}; medians of {options.rounds - 1} alternating rounds after 1 warm-up\n")
    print("| contender | median (s) | / generate | per round (s) | aten ops | MiB allocated |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    base = statistics.median(seconds["generate"][1:])
    for name, times in seconds.items():
        measured = times[1:]
        ops, allocated = profiles[name]
        print(f"| {name} | {statistics.median(measured):.3f} | {statistics.median(measured) / base:.2f} | "
              f"{', '.join(f'{t:.3f}' for t in measured)} | {ops} | {allocated / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
