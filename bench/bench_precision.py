"""What bfloat16 does to the KL estimators: value and gradient error against float64.

The inputs are SmolLM2-135M's final hidden states h_p [B, T, d] on windows of the bundled
prompts and its output layer W [V, d]; the reference's hidden states are h_q = h_p + noise
(``--ref-noise`` times their RMS), so that pi and pi_ref are close, as in KL-regularised
fine-tuning. Truth is everything in float64. Each variant computes the logits z = h W^T and then:

- ``float32``: all in float32;
- ``bf16 head, fp32 KL``: the output layer under ``torch.autocast(bfloat16)`` (bfloat16 logits),
  then ``kl_estimators``, which upcasts half-precision logits and computes log-softmax, KL and
  log-ratios in float32;
- ``bf16 head, bf16 KL``: the same bfloat16 logits with log-softmax, KL and ratios kept in
  bfloat16 (what skipping the upcast would give);
- ``bf16 trunk, fp32 head``: h_p from the model's trunk under bfloat16 autocast (h_q: the same
  noise added), the output layer and the KL in float32 (``--dtype bfloat16 --fp32-head``);
- ``bf16 trunk and head, fp32 KL``: h_p from the bfloat16 trunk and the output layer under
  autocast, the KL in float32 (PPOKL's ``--dtype bfloat16``; TRL's ``bf16=True`` autocasts the
  whole model the same way);
- ``fused, fp32 products`` and ``fused, bf16 products``: ``kl_estimators.fused_kl`` from the
  float32 hidden states, with ``LinearLogits(product_dtype=None)`` (float32 products) and
  ``product_dtype=torch.bfloat16`` (the output layer's forward and backward products in bfloat16,
  everything else in float32).

Errors, over the B x T positions (medians, and the maximum): the analytic KL(pi || pi_ref)
(relative), its gradient with respect to h_p (relative L2 per position, through the output
layer's backward in the variant's precision), the token log-ratio log pi(y) - log pi_ref(y) at
tokens y drawn from pi in float64 (absolute; ``exp`` of it is the error factor of an importance
weight pi_ref/pi), and k3 = r - 1 - log r, r = pi_ref(y)/pi(y) (absolute). Deterministic
(no timing), so it can run on a loaded machine.

    python bench/bench_precision.py [--model smollm2-135m] [--batch 8] [--length 64] [--ref-noise 0.1]
"""

from __future__ import annotations

import argparse

import torch

import kl_estimators
from lmgym.assets import load_causal_lm
from lmgym.prompts import load_prompts

VARIANTS = (
    "float32", "bf16 head, fp32 KL", "bf16 head, bf16 KL", "bf16 trunk, fp32 head", "bf16 trunk and head, fp32 KL",
    "fused, fp32 products", "fused, bf16 products",
)


def hidden_states(model, tokenizer, batch: int, length: int, bf16: bool) -> torch.Tensor:
    """Final (normed) hidden states [batch, length, d] on consecutive windows of the bundled prompts,
    float32 or (``bf16``) with the model's trunk under bfloat16 autocast."""
    stream: list[int] = []
    for text in load_prompts():
        stream += tokenizer(text)["input_ids"]
        if len(stream) >= batch * length:
            break
    if len(stream) < batch * length:
        raise SystemExit(f"the bundled prompts have {len(stream)} tokens, fewer than --batch x --length")
    ids = torch.tensor(stream[: batch * length]).view(batch, length)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()


def evaluate(variant: str, hp: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> dict:
    """KL [B, T], its gradient with respect to h_p [B, T, d], log-ratio and k3 at ``tokens`` [B, T]."""
    dtype = torch.float64 if variant == "float64" else torch.float32
    hp, hq, weight = hp.to(dtype).requires_grad_(True), hq.to(dtype), weight.to(dtype)
    if variant.startswith("fused"):
        return evaluate_fused(hp, hq, weight, tokens, torch.bfloat16 if "bf16" in variant else None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.startswith("bf16") and "fp32 head" not in variant):
        zp, zq = torch.nn.functional.linear(hp, weight), torch.nn.functional.linear(hq, weight)
    if variant.endswith("bf16 KL"):
        logp, logq = zp.log_softmax(-1), zq.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = kl_estimators.analytic(zp, zq, chunk_size=64)
        logp, logq = kl_estimators.values.upcast(zp).log_softmax(-1), kl_estimators.values.upcast(zq).log_softmax(-1)
    (grad,) = torch.autograd.grad(kl.sum(), hp)
    with torch.no_grad():
        log_ratio = (logp - logq).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return result(kl, grad, log_ratio)


def evaluate_fused(hp: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, product_dtype) -> dict:
    """``evaluate`` through ``kl_estimators.fused_kl`` with products in ``product_dtype``."""
    out = kl_estimators.fused_kl(
        kl_estimators.LinearLogits(hp, weight, product_dtype=product_dtype),
        kl_estimators.LinearLogits(hq, weight, product_dtype=product_dtype), tokens, chunk_size=64,
    )
    (grad,) = torch.autograd.grad(out.kl.sum(), hp)
    return result(out.kl, grad, out.logprobs - out.ref_logprobs)


def result(kl: torch.Tensor, grad: torch.Tensor, log_ratio: torch.Tensor) -> dict:
    """The four compared quantities in float64: KL, its gradient, the log-ratio and k3 = e^-lr - 1 + lr."""
    log_ratio = log_ratio.detach()
    k3 = (-log_ratio).exp() - 1 + log_ratio
    return {name: value.detach().double() for name, value in (("kl", kl), ("grad", grad), ("log_ratio", log_ratio), ("k3", k3))}


def errors(result: dict, truth: dict) -> dict[str, torch.Tensor]:
    return {
        "kl": ((result["kl"] - truth["kl"]).abs() / truth["kl"]).flatten(),
        "grad": ((result["grad"] - truth["grad"]).norm(dim=-1) / truth["grad"].norm(dim=-1)).flatten(),
        "log_ratio": (result["log_ratio"] - truth["log_ratio"]).abs().flatten(),
        "k3": (result["k3"] - truth["k3"]).abs().flatten(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--ref-noise", type=float, default=0.1, help="h_q = h_p + this x RMS(h_p) x N(0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    model, tokenizer = load_causal_lm(options.model)
    weight = model.get_output_embeddings().weight.detach().float()
    hp = hidden_states(model, tokenizer, options.batch, options.length, bf16=False)
    hp_bf16 = hidden_states(model, tokenizer, options.batch, options.length, bf16=True)
    g = torch.Generator().manual_seed(options.seed)
    noise = options.ref_noise * hp.pow(2).mean().sqrt() * torch.randn(hp.shape, generator=g)
    hq, hq_bf16 = hp + noise, hp_bf16 + noise
    with torch.no_grad():
        probs = (hp.double() @ weight.double().T).softmax(-1)
    tokens = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=g).view(hp.shape[:2])
    del probs
    truth = evaluate("float64", hp, hq, weight, tokens)
    kl = truth["kl"].flatten()
    print(f"\n{options.model}: V {weight.shape[0]}, d {weight.shape[1]}, {options.batch} x {options.length} positions of the "
          f"bundled prompts; h_q = h_p + {options.ref_noise} RMS noise: KL(pi || pi_ref) median {kl.median():.3g} "
          f"(min {kl.min():.3g}, max {kl.max():.3g}) nats; errors against float64, median (max) over positions\n")
    print("| variant | KL, relative | dKL/dh_p, relative L2 | log-ratio, absolute | k3, absolute |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant in VARIANTS:
        trunk = (hp_bf16, hq_bf16) if "trunk" in variant else (hp, hq)
        err = errors(evaluate(variant, *trunk, weight, tokens), truth)
        cells = " | ".join(f"{err[k].median():.2e} ({err[k].max():.2e})" for k in ("kl", "grad", "log_ratio", "k3"))
        print(f"| {variant} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
