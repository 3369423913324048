"""One PPOKL iteration against a straightforward Hugging Face baseline of the same work and the FLOP floor.

In one process, alternating round by round (so that load from other processes hits all alike):

- ``PPOKL analytic``: ``collect_rollouts`` + ``train`` of the config (demo: analytic KL reward and
  analytic gradient);
- ``PPOKL k1``: the same model with the k1 reward and no analytic gradient (the exact KL is still
  computed in the rollout for the ``rollout/kl_analytic`` metric), to price the analytic KL;
- ``HF baseline`` (a stand-in for TRL's online trainer): the policy's ``generate`` with sampling,
  one no-grad policy forward (old log-probs, values) and one reference forward over the finished
  sequences, reward scoring, k1-shaped rewards and GAE, then the PPO forward/backward and a
  default AdamW step (a per-parameter loop on CPU) per minibatch; its own copy of the policy, the
  env's reference. Like TRL it computes logits at every position and slices the generated ones.

The FLOP floor is the matmul work of the iteration at the GEMM rate measured in every round
(``torch.nn.functional.linear`` with the model's own weight shapes on ``n_envs x (prompt + new)``
token rows, the shape of a whole-batch forward). A forward costs 2 FLOPs per weight per token, the
output layer only where logits are needed: the states s_0..s_{T-1} of each row (its prompt and
T - 1 generated tokens through the trunk, T positions through the output layer). Rollout: that
forward for the policy and for the reference; update: forward + backward (3x) per epoch. Attention
scores (about 1 % at these lengths) are left out, so the floor is a lower bound. The rollout's
one-token steps multiply ``n_envs``-row matrices, which run slower than the floor's rate: a second
rollout floor prices them at the GEMM rate measured on ``n_envs`` rows. The same count for
the baseline's work (whole sequences, logits everywhere, one more policy forward) gives the ratio
PPOKL / baseline that equal matmul efficiency would give.

    python bench/bench_iteration.py [--config configs/demo.yaml] [--rounds 4] [--threads 1] [any agents.ppo_kl flag]

Flags it does not know go to the run's arguments (``agents.cli.config``), e.g. ``--ref-logits hidden``
or ``--model PATH``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import numpy as np
import torch
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger
from torch import nn

from agents.rollout.advantages import gae, shaped_rewards
from agents.algorithm import PPOKL
from agents.cli.config import Args, parse_args
from agents.cli.train import build_model, make_envs
import kl_estimators
from lmgym.assets import load_causal_lm
from lmgym.decoding import position_ids_from_mask
from lmgym.task import ContinuationTask


def quiet(model: PPOKL) -> PPOKL:
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def ppokl_iteration(model: PPOKL, callback: CallbackList, kl_reward: str, analytic_grad: bool) -> tuple[float, float]:
    """Seconds of one rollout and one update of ``model`` with the given KL handling."""
    model.kl_reward, model.analytic_grad = kl_reward, analytic_grad
    start = time.perf_counter()
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    middle = time.perf_counter()
    model.train()
    return middle - start, time.perf_counter() - middle


class HFBaseline:
    """Generate, score, PPO-update: the plain Hugging Face way, with the task's prompts and reward."""

    def __init__(self, args: Args, task: ContinuationTask, policy: nn.Module, value_head: nn.Module, seed: int):
        self.args = args
        self.task = task
        self.policy = copy.deepcopy(policy)
        self.value_head = copy.deepcopy(value_head)
        self.ref = task.ref_model
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.policy.parameters()},
                {"params": self.value_head.parameters(), "lr": args.vf_learning_rate},
            ],
            lr=args.learning_rate,
            weight_decay=0.0,
        )
        self.rng = np.random.default_rng(seed)

    def forward(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax [B, n, V] at the positions that predict the last ``n`` tokens, final hidden
        [B, n, H]; logits at every position, then sliced, as TRL's trainers do."""
        position_ids = position_ids_from_mask(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        return out.logits[:, -n - 1 : -1].float().log_softmax(-1), out.hidden_states[-1][:, -n - 1 : -1]

    def rollout(self) -> dict[str, torch.Tensor]:
        args, task = self.args, self.task
        prompt_ids, prompt_mask = task.batch([task.sample_prompt(self.rng)[1] for _ in range(args.n_envs)])
        with torch.no_grad():
            ids = self.policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=task.pad_id,
                eos_token_id=task.eos_id,
            )
            actions = ids[:, prompt_ids.shape[1] :]
            ended = (actions == task.eos_id).long().cumsum(1)
            mask = (ended - (actions == task.eos_id).long()) == 0  # up to and including the first EOS
            attention = torch.cat([prompt_mask, mask.long()], dim=1)
            n = actions.shape[1]
            logp, hidden = self.forward(self.policy, ids, attention, n)
            ref_logp, _ = self.forward(self.ref, ids, attention, n)
            logprobs = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            ref_logprobs = ref_logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            values = self.value_head(hidden).squeeze(-1) * mask
            texts = [task.decode(row[m].tolist()) for row, m in zip(actions, mask)]
            scores = torch.as_tensor(task.score(texts))
            kl = kl_estimators.k1(logprobs, ref_logprobs, mask)
            rewards = shaped_rewards(scores, kl, self.args.kl_coef, mask)
            advantages, returns = gae(rewards, values, mask, args.gamma, args.gae_lambda)
        return dict(
            ids=ids, attention=attention, actions=actions, mask=mask, logprobs=logprobs, advantages=advantages, returns=returns
        )

    def update(self, data: dict[str, torch.Tensor]) -> None:
        args = self.args
        n_rows, n = data["actions"].shape
        per_batch = max(1, round(args.batch_size / n))
        for _ in range(args.n_epochs):
            for rows in torch.randperm(n_rows).split(per_batch):
                mask = data["mask"][rows].float()
                logp, hidden = self.forward(self.policy, data["ids"][rows], data["attention"][rows], n)
                logprobs = logp.gather(-1, data["actions"][rows].unsqueeze(-1)).squeeze(-1)
                values = self.value_head(hidden.detach()).squeeze(-1)
                ratio = (logprobs - data["logprobs"][rows]).exp()
                adv = data["advantages"][rows]
                clipped = ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
                policy_loss = -(torch.min(adv * ratio, adv * clipped) * mask).sum() / mask.sum()
                value_loss = ((data["returns"][rows] - values) ** 2 * mask).sum() / mask.sum()
                self.optimizer.zero_grad()
                (policy_loss + args.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()) + list(self.value_head.parameters()), args.max_grad_norm)
                self.optimizer.step()

    def iteration(self) -> tuple[float, float]:
        start = time.perf_counter()
        data = self.rollout()
        middle = time.perf_counter()
        self.update(data)
        return middle - start, time.perf_counter() - middle


def gemm_rate(model: nn.Module, rows: int, repeats: int = 5, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> float:
    """FLOP/s of ``F.linear`` in ``dtype`` on ``device`` over every Linear weight of ``model`` (lm_head
    included) on ``rows`` token rows."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    shapes = [module.weight.shape for module in model.modules() if isinstance(module, nn.Linear)]
    flops, seconds = 0.0, 0.0
    for shape in sorted(set(shapes)):
        weight = torch.randn(shape, dtype=dtype, device=device)
        x = torch.randn(rows, shape[1], dtype=dtype, device=device)
        torch.nn.functional.linear(x, weight)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            sync()
            times.append(time.perf_counter() - start)
        count = shapes.count(shape)
        flops += count * 2 * rows * shape[0] * shape[1]
        seconds += count * statistics.median(times)
    return flops / seconds


def forward_flops(model: nn.Module, tokens: int, logit_positions: int) -> float:
    """Matmul FLOPs of a forward over ``tokens`` tokens with output logits at ``logit_positions``."""
    head = model.get_output_embeddings().weight.numel()
    trunk = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) - head
    return 2 * trunk * tokens + 2 * head * logit_positions


def work_flops(model: nn.Module, args: Args) -> dict[str, float]:
    """Matmul FLOPs of the minimal rollout and update (the floor) and of the HF baseline's iteration,
    and ``hidden_extra``: the output-layer passes that ``--ref-logits hidden`` adds to them, over
    the n x t sampled positions. The rollout's fused KL computes the policy's logits again (+1; the
    reference's head runs there instead of in its forward), and each epoch's ``fused_kl`` computes
    the reference's logits (+1) and, in its backward, both models' logits again (+2): 1 + 3 epochs
    passes of 2 V d FLOPs per position."""
    n, p, t = args.n_envs, args.max_prompt_tokens, args.max_new_tokens
    head = model.get_output_embeddings().weight.numel()
    needed = forward_flops(model, n * (p + t - 1), n * t)  # states s_0..s_{T-1}, logits of a_0..a_{T-1}
    full = forward_flops(model, n * (p + t), n * (p + t))  # TRL-style forward, logits everywhere
    return {
        "decode": forward_flops(model, n * (t - 1), n * (t - 1)),  # the rollout's one-token policy steps (n rows each)
        "rollout": 2 * needed,  # policy and reference
        "update": 3 * args.n_epochs * needed,  # forward + backward
        "baseline": needed + 2 * full + 3 * args.n_epochs * full,  # generate, policy + reference scoring, update
        "hidden_extra": (1 + 3 * args.n_epochs) * 2 * head * n * t,
    }


def flop_floor(flops: dict[str, float], rate: float) -> dict[str, float]:
    """Seconds of the minimal rollout and update (``work_flops``) at ``rate`` FLOP/s."""
    return {part: flops[part] / rate for part in ("rollout", "update")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the three contenders (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    options, run_flags = parser.parse_known_args(argv)
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)

    args = parse_args(["--config", options.config, "--eval-every", "0", "--seed", str(options.seed), *run_flags])
    load_causal_lm(args.model)  # make sure the converted model is cached
    start = time.perf_counter()
    load_causal_lm(args.model)
    load_seconds = time.perf_counter() - start

    env, _ = make_envs(args)
    model = quiet(build_model(args, env, out=None, resume=False))  # type: ignore[arg-type]
    _, callback = model.setup_learn(10**9, CallbackList([]))
    callback.on_training_start(locals(), globals())
    baseline = HFBaseline(args, env.venv.task, model.policy.lm, model.policy.value_head, options.seed)

    flops = work_flops(model.policy.lm, args)
    rows = args.n_envs * (args.max_prompt_tokens + args.max_new_tokens)
    times: dict[str, list[tuple[float, float]]] = {"PPOKL analytic": [], "PPOKL k1": [], "HF baseline": []}
    rates: list[float] = []
    decode_rates: list[float] = []  # the one-token steps' products have n_envs rows
    for round_ in range(options.rounds):
        rates.append(gemm_rate(model.policy.lm, rows))  # in every round: the load changes
        decode_rates.append(gemm_rate(model.policy.lm, args.n_envs))
        for name in times:
            gc.collect()
            if name == "HF baseline":
                result = baseline.iteration()
            else:
                result = ppokl_iteration(model, callback, *(("analytic", True) if name == "PPOKL analytic" else ("k1", False)))
            if round_:
                times[name].append(result)
            print(f"round {round_} {name}: rollout {result[0]:.2f} s, update {result[1]:.2f} s", flush=True)
        if round_:
            report(options, args, times, flops, statistics.median(rates[1:]), statistics.median(decode_rates[1:]), load_seconds)


def report(
    options, args: Args, times: dict[str, list[tuple[float, float]]], flops: dict[str, float], rate: float, decode_rate: float,
    load_seconds: float,
) -> None:
    floor = flop_floor(flops, rate)
    # the same work with the one-token steps' products at the rate of their own (n_envs-row) shapes
    decode_floor = floor["rollout"] + flops["decode"] * (1 / decode_rate - 1 / rate)
    medians = {
        name: {"rollout": statistics.median(r for r, _ in rows), "update": statistics.median(u for _, u in rows),
               "iteration": statistics.median(r + u for r, u in rows)}
        for name, rows in times.items()
    }
    ours, k1, hf = medians["PPOKL analytic"], medians["PPOKL k1"], medians["HF baseline"]
    rounds = len(times["HF baseline"])
    print(f"\n{options.config}: {args.n_envs} envs x ({args.max_prompt_tokens} + {args.max_new_tokens}) tokens, "
          f"{args.n_epochs} epoch(s), batch {args.batch_size}; torch threads {torch.get_num_threads()}; "
          f"medians of {rounds} round(s) after 1 warm-up\n")
    print("| contender | rollout (s) | update (s) | iteration (s) |")
    print("| --- | ---: | ---: | ---: |")
    for name, m in medians.items():
        print(f"| {name} | {m['rollout']:.2f} | {m['update']:.2f} | {m['iteration']:.2f} |")
    print(f"| FLOP floor at {rate / 1e9:.0f} GFLOP/s | {floor['rollout']:.2f} | {floor['update']:.2f} | "
          f"{floor['rollout'] + floor['update']:.2f} |")
    print()
    print(f"- PPOKL analytic / HF baseline, iteration: {ours['iteration'] / hf['iteration']:.2f} "
          f"(rollout {ours['rollout'] / hf['rollout']:.2f}, update {ours['update'] / hf['update']:.2f})")
    print(f"- PPOKL k1 / HF baseline, iteration: {k1['iteration'] / hf['iteration']:.2f}")
    print(f"- matmul work, PPOKL / HF baseline: {(flops['rollout'] + flops['update']) / flops['baseline']:.2f} "
          f"(the ratio PPOKL would reach if both ran their matmuls at the same rate and nothing else)")
    print(f"- PPOKL rollout / floor: {ours['rollout'] / floor['rollout']:.2f}; update / floor: {ours['update'] / floor['update']:.2f}")
    print(f"- PPOKL rollout / floor with its one-token steps at their {args.n_envs}-row GEMM rate ({decode_rate / 1e9:.0f} GFLOP/s): "
          f"{ours['rollout'] / decode_floor:.2f} (that floor: {decode_floor:.2f} s)")
    print(f"- HF baseline rollout / floor: {hf['rollout'] / floor['rollout']:.2f}; update / floor: {hf['update'] / floor['update']:.2f}")
    print(f"- analytic KL (reward + gradient) share of the iteration vs k1: "
          f"{(ours['iteration'] - k1['iteration']) / ours['iteration']:+.1%}")
    print(f"- embedded model load, cached: {load_seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
