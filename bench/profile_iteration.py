"""Where a PPOKL iteration's time goes: wall-clock phases and torch.profiler's operator table.

Runs warm-up iterations of the config, then ``--iters`` profiled ones. Phases are measured by
wrapping the functions that do each piece of work (nested phases are subtracted from their parent,
so the table adds up to the iteration). ``--torch-profile`` also prints torch.profiler's operator
table of one rollout and one update, with the output layer's matmuls (the ones whose output has
the vocabulary's width) split from the others.

    python bench/profile_iteration.py [--config configs/demo.yaml] [--iters 2] [--threads 1] [--torch-profile] [any agents.ppo_kl flag]

Flags it does not know go to the run's arguments (``agents.cli.config``), e.g. ``--ref-logits hidden``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections import defaultdict

import torch
from stable_baselines3.common.callbacks import CallbackList

import kl_estimators
from agents import algorithm
from agents.cli.config import parse_args
from agents.cli.train import build_model, make_envs
from bench_iteration import quiet
from lmgym import decoding


class Phases:
    """Exclusive wall-clock seconds per label: time in a nested phase is not counted in its parent."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [label, start, child seconds]
        self.patches: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label) -> None:
        """Time ``owner.name`` under ``label`` (a string, or a function of the call's arguments)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(label(*args, **kwargs) if callable(label) else label):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        self.patches.append((owner, name, original))

    @contextlib.contextmanager
    def phase(self, label: str):
        self.stack.append([label, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            label, start, children = self.stack.pop()
            total = time.perf_counter() - start
            self.seconds[label] += total - children
            if self.stack:
                self.stack[-1][2] += total

    def restore(self) -> None:
        for owner, name, original in reversed(self.patches):
            setattr(owner, name, original)


def instrument(model, phases: Phases) -> None:
    env = model.env.venv
    ref = env.task.ref_model

    def decoder_label(decoder, *args, **kwargs):
        who = "reference" if decoder.model is ref else "policy"
        return f"{who} forward ({'prompt encode' if args[0].shape[1] > 1 else 'one token'})"

    phases.wrap(decoding.IncrementalDecoder, "_forward", decoder_label)
    phases.wrap(model.reference, "logits", "reference forward (whole sequences, after sampling)")
    phases.wrap(type(env), "step", "env step: other (obs layout, numpy copies, log-probs)")
    phases.wrap(type(env), "reset", "env reset: other")
    phases.wrap(env.task, "score", "env: reward (VADER)")
    phases.wrap(env.task, "decode", "env: detokenise")
    phases.wrap(env.task, "sample_prompt", "env: draw + tokenise prompts")
    phases.wrap(kl_estimators, "analytic", "analytic KL (rollout, per step)")
    phases.wrap(model, "collect_rollouts", "rollout: rest (sampling, value head, copies, stats)")
    phases.wrap(model, "train", "update: rest (losses, metrics)")
    phases.wrap(model.rollout_buffer, "add", "rollout: buffer add")
    phases.wrap(model.rollout_buffer, "compute_returns_and_advantage", "rollout: rewards + GAE")
    phases.wrap(model.policy, "sequence_forward", "update: policy forward")
    phases.wrap(model.policy, "sequence_hidden", "update: policy forward (to the hidden states)")
    phases.wrap(
        kl_estimators, "fused_kl",
        lambda *a, **k: "update: fused output layers, log-probs and KL (forward)" if torch.is_grad_enabled() else "rollout: fused KL and log pi_ref (--ref-logits hidden)",
    )
    phases.wrap(model.reference, "hidden", "reference forward (whole sequences, hidden states only)")
    phases.wrap(torch.distributions.Categorical, "sample", "rollout: sampling from the softmax")
    phases.wrap(model, "kl_loss_term", "update: analytic KL loss (forward)")
    phases.wrap(torch.Tensor, "backward", "update: backward")
    phases.wrap(algorithm.torch.nn.utils, "clip_grad_norm_", "update: gradient clipping")
    phases.wrap(model.policy.optimizer, "step", "update: AdamW step")


def print_phases(phases: Phases, total: float, iters: int) -> None:
    print(f"\n| phase | s / iteration | share |\n| --- | ---: | ---: |")
    for label, seconds in sorted(phases.seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds / iters:.3f} | {seconds / total:.1%} |")
    print(f"| **total** | {total / iters:.3f} | 100% |")


def print_operators(prof, vocab: int, rows: int = 15) -> None:
    head, other = 0.0, 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            shapes = event.input_shapes
            wide = any(shape and shape[-1] == vocab for shape in shapes) or any(shape and shape[0] == vocab for shape in shapes)
            if wide:
                head += event.self_cpu_time_total
            else:
                other += event.self_cpu_time_total
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\nmatmuls: output layer {head / 1e6:.3f} s ({head / total:.1%}), others {other / 1e6:.3f} s ({other / total:.1%}) "
          f"of {total / 1e6:.3f} s self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def learner(config: str, threads: int, run_flags: list[str]):
    """A quiet PPOKL of ``config`` (plus ``run_flags``, no evaluation) set up to learn, and its callback,
    with torch on ``threads`` threads: ``model.collect_rollouts(...)`` and ``model.train()`` are then
    one iteration."""
    torch.set_num_threads(threads)
    args = parse_args(["--config", config, "--eval-every", "0", *run_flags])
    env, _ = make_envs(args)
    model = quiet(build_model(args, env, out=None, resume=False))  # type: ignore[arg-type]
    _, callback = model.setup_learn(10**9, CallbackList([]))
    return model, callback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-profile", action="store_true")
    options, run_flags = parser.parse_known_args(argv)
    model, callback = learner(options.config, options.threads, run_flags)

    def iteration():
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        model.train()

    for _ in range(options.warmup):
        iteration()
    phases = Phases()
    instrument(model, phases)
    start = time.perf_counter()
    for _ in range(options.iters):
        iteration()
    total = time.perf_counter() - start
    phases.restore()
    print(f"{options.config}, torch threads {torch.get_num_threads()}, {options.iters} iterations after {options.warmup} warm-up")
    print_phases(phases, total, options.iters)
    if options.torch_profile:
        vocab = model.policy.lm.get_output_embeddings().weight.shape[0]
        for name, work in (("rollout", lambda: model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)),
                           ("update", model.train)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                work()
            print(f"\n### {name}")
            print_operators(prof, vocab)


if __name__ == "__main__":
    main()
