"""``python -m studies.lm_variance``: every KL-gradient estimator's gradient, sampled on the real LM.

    python -m studies.lm_variance_policies           # train the fixed policies (once)
    python -m studies.lm_variance                    # sample, resumable
    python -m studies.lm_variance --report           # only regenerate the summary and the plots

At each fixed policy pi (``studies.lm_variance_policies``: PPOKL runs at beta = 0.3, 0.1, 0.03 on
the embedded SmolLM2-135M and the IMDB task, 16-token prompts and continuations) and each regime
(on-policy, y ~ pi; off-policy, y ~ mu = the same run one iteration, two Adam updates, earlier),
independent sequences are drawn: a prompt uniformly from the training prompts, a continuation
from the full softmax until EOS or 16 tokens. Every estimator is evaluated on the same sequences.
Each sequence's own gradient g(y) is kept (sequences are i.i.d., so a batch of n estimates with
the mean of n of them, and Var[batch mean] = Var[g] / n).

What is measured. Given the sampled tokens, every estimator's loss is a function of pi's logits
z_t alone (log pi and, for the analytic ones, the whole softmax), so its gradient w.r.t. any
parameter is J^T delta, delta_t = dS/dz_t and J the network's Jacobian on this sequence, the same
linear map for all estimators. The study records the exact block of the output layer (SmolLM2's
tied embedding, [V, d]): G = sum_t delta_t h_t^T, h_t the final hidden state feeding the logits
(z = W h; checked to be exact). G has 28 M entries, so per sequence it keeps (i) its exact squared
norm |G|_F^2 = sum_{t,t'} (h_t . h_t')(delta_t . delta_t') and (ii) a fixed random projection
C G A^T (C: [K_V, V], A: [K_D, d], i.i.d. N(0, 1/K) entries, one seed for the whole study):
E_{A,C}<C G A^T, C G' A^T> = <G, G'>, so means, variances and cosines computed in the projection
are unbiased for those of G (the report compares projected with exact squared norms as a check).
The rest of the network (the input-embedding use of the same matrix and the transformer body) is
not measured; it receives the same deltas through other Jacobian blocks.

Raw results: one safetensors file per (policy, regime) under ``--out/raw`` (git-ignored: about
4 MB each), rewritten atomically after every chunk of sequences; a rerun continues from the
sequences it holds. The summary (``--out/summary.json``, with bootstrap intervals), table and plot
are regenerated from them and committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kl_estimators
from studies.cli_checks import FolderLock, check_out, number, number_list, run_cli
from lmgym.assets import load_causal_lm
from lmgym.decoding import decode_in_lockstep
from lmgym.task import ContinuationTask, log_prob
from studies.lm_variance_policies import BEHAVIOUR, BETAS, run_dir
from studies.lm_variance_records import load_raw, raw_path, save_raw
from studies.moments_grid import label

K_V, K_D = 16, 16  # projection sizes along the vocabulary and the hidden dimension
PROJECTION_SEED = 20261129
PROMPT_TOKENS = NEW_TOKENS = 16
REFERENCE = "smollm2-135m"
# (estimator, options): every ESTIMATOR_INFO entry, and off-policy the importance-weighted forms.
ON_POLICY: tuple[tuple[str, dict], ...] = tuple((name, {}) for name in kl_estimators.ESTIMATORS)
OFF_POLICY: tuple[tuple[str, dict], ...] = ON_POLICY + (
    ("reinforce-future", {"importance": "sequence"}),
    ("analytic-future", {"importance": "sequence"}),
    ("reinforce-future", {"importance": "token"}),
)


def runs_for(regime: str) -> tuple[tuple[str, dict], ...]:
    return ON_POLICY if regime == "on" else OFF_POLICY


@dataclass
class Sampled:
    """One batch: pi's logits and final hidden states, pi_ref's logits, log mu, tokens, mask."""

    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, d]
    ref_logits: torch.Tensor  # [B, T, V]
    behaviour_logprobs: torch.Tensor | None  # [B, T]
    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool


@torch.no_grad()
def sample_batch(policy, behaviour, task: ContinuationTask, batch: int, gen: torch.Generator, rng: np.random.Generator) -> Sampled:
    """B prompts and continuations y ~ mu (``behaviour``; pi when None), with pi's and pi_ref's outputs."""
    prompts = [task.sample_prompt(rng)[1] for _ in range(batch)]
    ids, attention = task.batch(prompts)
    models = [policy, task.ref_model] + ([behaviour] if behaviour is not None else [])

    def sample(outputs) -> torch.Tensor:  # from mu (the last model), or pi without a behaviour policy
        return torch.multinomial(outputs[-1 if behaviour is not None else 0].logits.softmax(-1), 1, generator=gen).squeeze(-1)

    logits, hidden, ref_logits, mu_logp, tokens, mask = [], [], [], [], [], []
    for outputs, actions, active in decode_in_lockstep(models, ids, attention, task.max_new_tokens, task.eos_id, sample, (True,)):
        pi_out, ref_out = outputs[0], outputs[1]
        logits.append(pi_out.logits)
        hidden.append(pi_out.hidden)
        ref_logits.append(ref_out.logits)
        mu_logp.append(log_prob(outputs[-1 if behaviour is not None else 0].logits, actions))
        tokens.append(actions)
        mask.append(active)
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return Sampled(stack(logits), stack(hidden), stack(ref_logits), stack(mu_logp) if behaviour is not None else None, stack(tokens), stack(mask))


def logit_gradient(s: Sampled, estimator: str, options: dict) -> torch.Tensor:
    """[B, T, V] delta_bt = dS_b / dz_bt: row b is sequence b's own estimate (S_b its per-token sum)."""
    logits = s.logits.detach().requires_grad_()
    logp = log_prob(logits, s.tokens)
    ref_logp = log_prob(s.ref_logits, s.tokens)
    terms = kl_estimators.per_token_kl_loss(
        estimator, logp, ref_logp, s.mask, logits, s.ref_logits, behaviour_logprobs=s.behaviour_logprobs, **options
    )
    return torch.autograd.grad(terms.sum(), logits)[0] * s.mask.unsqueeze(-1)


def projections(vocab: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The study's fixed C [K_V, V] and A [K_D, d], entries N(0, 1/K)."""
    gen = torch.Generator().manual_seed(PROJECTION_SEED)
    c = torch.randn(K_V, vocab, generator=gen) / K_V**0.5
    a = torch.randn(K_D, dim, generator=gen) / K_D**0.5
    return c, a


def output_layer_statistics(delta: torch.Tensor, hidden: torch.Tensor, c, a) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b, C G_b A^T flattened [B, K_V K_D] and the exact |G_b|_F^2 [B] (float64),
    G_b = sum_t delta_bt h_bt^T."""
    h = hidden.double()
    projected = torch.einsum("btk,btj->bkj", (delta @ c.T).double(), h @ a.double().T).flatten(1)
    exact = ((delta @ delta.transpose(1, 2)).double() * (h @ h.transpose(1, 2))).sum((1, 2))
    return projected, exact


def sequence_statistics(s: Sampled, runs, c, a) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, E, K_V K_D] projections and [B, E] exact squared norms of every estimator's per-sequence
    output-layer gradient."""
    stats = [output_layer_statistics(logit_gradient(s, e, o), s.hidden, c, a) for e, o in runs]
    return torch.stack([p for p, _ in stats], 1).float(), torch.stack([x for _, x in stats], 1)


def kl_along(s: Sampled) -> torch.Tensor:
    """[B] sum_t KL(pi || pi_ref) at the visited positions (its mean estimates the sequence KL)."""
    return kl_estimators.analytic(s.logits, s.ref_logits, mask=s.mask).sum(-1)


def policy_names(betas: list[float]) -> list[str]:
    """``reference`` (pi = pi_ref, on-policy only) and one ``k1-b<beta>`` per trained policy."""
    return ["reference", *(run_dir(Path(), beta).name for beta in betas)]


def chunk_record(s: Sampled, runs, c, a) -> dict[str, torch.Tensor]:
    """The per-sequence rows one sampled chunk adds to the raw file."""
    projected, exact = sequence_statistics(s, runs, c, a)
    record = {"projected": projected, "exact_norm_sq": exact, "kl": kl_along(s).double(), "n_tokens": s.mask.sum(-1).double()}
    if s.behaviour_logprobs is not None:  # sum_t log pi/mu along y ~ mu: its mean is -KL(mu || pi)
        logp = log_prob(s.logits, s.tokens)
        record["log_ratio"] = torch.where(s.mask, logp - s.behaviour_logprobs, 0.0).sum(-1).double()
    return record


def measure(raw: Path, root: Path, name: str, regime: str, n_sequences: int, chunk: int) -> None:
    """Sample chunks of ``chunk`` independent sequences until the raw file of (policy ``name``,
    regime) holds ``n_sequences``; it is rewritten after every chunk. Chunk i uses seed 2i (on) /
    2i+1 (off)."""
    path = raw_path(raw, name, regime)
    data, meta = load_raw(path) if path.is_file() else ({}, {"seconds": 0.0})
    done = len(data["exact_norm_sq"]) if data else 0
    if done >= n_sequences:
        return
    runs = runs_for(regime)
    policy = load_causal_lm(REFERENCE if name == "reference" else str(root / name / "policy"))[0]
    behaviour = load_causal_lm(str(root / name / BEHAVIOUR))[0] if regime == "off" else None
    task = ContinuationTask(model=policy, ref_model=REFERENCE, reward=lambda xs: np.zeros(len(xs)),
                            max_prompt_tokens=PROMPT_TOKENS, max_new_tokens=NEW_TOKENS)
    c, a = projections(policy.config.vocab_size, policy.config.hidden_size)
    meta.update(estimators=[label(e, o) for e, o in runs], chunk=chunk, k_v=K_V, k_d=K_D, projection_seed=PROJECTION_SEED,
                regime=regime, policy=name, threads=torch.get_num_threads())
    rows = {k: [v] for k, v in data.items()}
    while done < n_sequences:
        start = time.perf_counter()
        seed = 2 * (done // chunk) + (regime == "off")
        s = sample_batch(policy, behaviour, task, chunk, torch.Generator().manual_seed(seed), np.random.default_rng(seed))
        for key, value in chunk_record(s, runs, c, a).items():
            rows.setdefault(key, []).append(value)
        done += chunk
        meta["seconds"] += time.perf_counter() - start
        save_raw(path, {k: torch.cat(v) for k, v in rows.items()}, meta)
        print(f"{name} {regime}: {done}/{n_sequences} sequences", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.lm_variance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/lm_variance"), help="the policies' run folders")
    parser.add_argument("--out", type=Path, default=Path("results/lm_variance"))
    parser.add_argument("--betas", type=number_list(float, "--betas", 0.0, open_low=True), default=list(BETAS), help="trained policies to measure")
    parser.add_argument("--sequences", type=number(int, "--sequences", 2), default=200, help="independent sequences (batches of one) per policy and regime")
    parser.add_argument("--reference-sequences", type=number(int, "--reference-sequences", 2), default=40, help="sequences at pi = pi_ref (every estimator but k1-loss is 0 there)")
    parser.add_argument("--chunk", type=number(int, "--chunk", 1), default=20, help="sequences sampled together (one forward batch)")
    parser.add_argument("--report", action="store_true", help="only regenerate the summary and plots")
    options = parser.parse_args(argv)
    try:
        check_out(options.out)
    except ValueError as error:
        parser.error(str(error))
    return run_cli(lambda: _main_checked(options))


def _main_checked(options: argparse.Namespace) -> int:
    with FolderLock(options.out):
        return _measure_and_report(options)


def _measure_and_report(options: argparse.Namespace) -> int:
    if not options.report:
        for name in policy_names(options.betas)[1:]:
            if not (options.root / name / BEHAVIOUR).is_dir():
                print(f"error: no policy at {options.root / name}; run python -m studies.lm_variance_policies", file=sys.stderr)
                return 2
        torch.set_num_threads(1)
        raw = options.out / "raw"
        measure(raw, options.root, "reference", "on", options.reference_sequences, options.chunk)
        for name in policy_names(options.betas)[1:]:
            for regime in ("on", "off"):
                measure(raw, options.root, name, regime, options.sequences, options.chunk)
    from studies.lm_variance_report import write_report

    write_report(options.out / "raw", options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
