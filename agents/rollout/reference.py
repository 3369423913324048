"""Reference-model logits for the PPO update: stored during the rollout, recomputed per minibatch,
or stored as final hidden states and never materialised.

The analytic KL gradient needs pi_ref's whole next-token distribution at every generated
position. With N sequences per rank, T generated tokens, vocabulary V, hidden size d, b sequences
per minibatch and c rows per chunk of ``kl_estimators.fused_kl`` (float32, 4 bytes):

- ``store``: the rollout buffer keeps ``N x T x V x 4`` bytes from sampling until the update ends
  (they come free from the env, which computes them anyway); no extra forward.
- ``recompute``: the buffer keeps no logits; each minibatch costs one reference forward under
  ``no_grad`` and holds ``b x T x V x 4`` bytes while its loss is computed (plus the forward's
  transient activations); ``n_epochs`` extra reference forwards over the whole rollout per update.

- ``hidden``: the buffer keeps pi_ref's final hidden states, ``N x T x d x 4`` bytes (V / d = 85x
  less for SmolLM2, 170x for Qwen2.5-0.5B), from the one reference forward that scores the
  finished rollout (logits at one position per row only); the rollout's KL_t and log pi_ref(y_t)
  come from both models' hidden states through ``kl_estimators.fused_kl`` (the policy's from its
  sampling steps), so the rollout holds no ``[N, T, V]`` tensor either, only one step's ``[N, V]``
  sampling logits.
  The update's policy forward stops at the hidden states and ``kl_estimators.fused_kl`` computes
  KL_t, log pi(y_t) and the entropy from both models' hidden states and output layers, about
  ``4 x c x V x 4`` bytes at a time (``bench/bench_fused.py`` measured 4.1 such blocks): no
  ``[b, T, V]`` tensor exists in the update either.

In ``store`` and ``recompute`` the update also holds the policy's ``[b, T, V]`` logits and their
log-softmax, probabilities and gradient (about ``4 x b x T x V x 4`` bytes, autograd's saved
tensors included); ``hidden`` replaces them by the chunk. Recomputing saves ``(N - b) x T x V x 4``
bytes over storing, at the price of roughly one third of a policy forward+backward per minibatch;
``hidden`` costs the policy's and pi_ref's output layers once more over the rollout (in the fused
KL, instead of pi_ref's in its forward) and, in the update, recomputes both models' output layers
in backward (three more ``[c, d] x [d, V]`` products per chunk than unfused).
``memory_bytes`` evaluates these formulas.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedModel

from kl_estimators import LinearLogits

from agents.options import REF_LOGITS_MODES, check_options
from agents.rollout.records import SequenceBatch
from lmgym.decoding import forward_last, sequence_logits



@torch.no_grad()
def reference_hidden(
    ref_model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int
) -> torch.Tensor:
    """pi_ref's float32 final hidden states ``[b, T, d]`` at the states of ``Reference.logits``
    (its output layer applied to them gives those logits).

    They are the decoder's ``last_hidden_state`` (``get_decoder()``), caught by a forward hook, so
    the forward keeps one ``[b, L, d]`` tensor, not every layer's (``output_hidden_states``: 25x
    more for Qwen2.5-0.5B), and its output layer runs on one position per row."""
    device = ref_model.device
    input_ids, mask = input_ids.to(device), attention_mask.to(device)
    decoder = ref_model.get_decoder() if hasattr(ref_model, "get_decoder") else ref_model
    if decoder is ref_model:  # no separate decoder module: take the last of every layer's states
        out = forward_last(ref_model, input_ids, mask, 1, output_hidden_states=True)
        last = out.hidden_states[-1]
    else:
        captured: list[torch.Tensor] = []
        handle = decoder.register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
        try:
            forward_last(ref_model, input_ids, mask, 1)
        finally:
            handle.remove()
        (last,) = captured
    return last[:, -n_actions - 1 : -1].float().to(attention_mask.device)


def linear_logits(model: PreTrainedModel, hidden: torch.Tensor) -> LinearLogits:
    """``model``'s logits at final hidden states ``hidden`` [b, T, d], as factors for ``fused_kl``.

    ValueError for a model whose logits are not its output layer applied to the hidden state
    (logit soft-capping or scaling, or an output layer that is not a plain linear map)."""
    config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"ref_logits='hidden' needs logits = output_layer(hidden), but the model sets {name}")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"ref_logits='hidden' needs a torch.nn.Linear output layer, got {type(head).__name__}")
    return LinearLogits(hidden, head.weight, head.bias)


class Reference:
    """pi_ref, the frozen model the KL is taken to, held by the agent (``PPOKL.reference``): it scores
    whole sequences for the sampler (after the rollout), the buffer's ``recompute`` mode and the
    ``hidden`` mode's fused KL. The env keeps its own per-step ``info["ref_logits"]``."""

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @property
    def config(self):
        """pi_ref's Hugging Face config."""
        return self.model.config

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int) -> torch.Tensor:
        """pi_ref's float32 logits ``[b, T, V]`` at the states before each of the last ``n_actions``
        tokens of the left-padded rows (the layout of ``CausalLMPolicy.sequence_forward``), on the
        inputs' device."""
        device = self.model.device
        logits = sequence_logits(self.model, input_ids.to(device), attention_mask.to(device), n_actions)
        return logits.to(input_ids.device)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int) -> torch.Tensor:
        """pi_ref's float32 final hidden states ``[b, T, d]`` at the states of ``logits``
        (``reference_hidden``)."""
        return reference_hidden(self.model, input_ids, attention_mask, n_actions)

    def output_layer(self, hidden: torch.Tensor) -> LinearLogits:
        """pi_ref's logits at its final hidden states ``hidden`` [b, T, d], as factors for ``fused_kl``."""
        return linear_logits(self.model, hidden)

    def with_logits(self, batch: SequenceBatch) -> SequenceBatch:
        """A copy of ``batch`` with its ``ref_logits`` recomputed by one forward of pi_ref."""
        return dataclasses.replace(batch, ref_logits=self.logits(batch.input_ids, batch.attention_mask, batch.actions.shape[1]))


def memory_bytes(mode: str, n: int, t: int, vocab: int, hidden_size: int, b: int, chunk: int) -> dict[str, int]:
    """The float32 bytes of the formulas above: ``buffer`` (kept from the rollout to the end of the
    update) and ``update`` (the largest vocabulary-sized tensors of one minibatch's loss)."""
    check_options(ref_logits=mode)
    buffer = {"store": n * t * vocab, "recompute": 0, "hidden": n * t * hidden_size}[mode]
    update = {"store": 4 * b * t * vocab, "recompute": 5 * b * t * vocab, "hidden": 4 * chunk * vocab}[mode]
    return {"buffer": 4 * buffer, "update": 4 * update}


MEMORY_SETTINGS = {
    "SmolLM2-135M demo (N 24, T 16, b 8)": dict(n=24, t=16, vocab=49_152, hidden_size=576, b=8, chunk=64),
    "SmolLM2-135M, RL4LMs IMDB (N 10, T 48, b 1)": dict(n=10, t=48, vocab=49_152, hidden_size=576, b=1, chunk=64),
    "Qwen2.5-0.5B, long (N 64, T 1,024, b 4)": dict(n=64, t=1024, vocab=151_936, hidden_size=896, b=4, chunk=64),
}


def memory_table() -> str:
    """The docs' table of ``memory_bytes`` for every mode at ``MEMORY_SETTINGS`` (chunk 64 rows,
    PPOKL's default ``kl_chunk_size``)."""
    rows = ["| setting | ref_logits | buffer (MiB) | update, vocabulary-wide (MiB) |", "|---|---|---:|---:|"]
    for name, sizes in MEMORY_SETTINGS.items():
        for mode in REF_LOGITS_MODES:
            used = memory_bytes(mode, **sizes)
            rows.append(f"| {name} | `{mode}` | {used['buffer'] / 2**20:,.1f} | {used['update'] / 2**20:,.1f} |")
    return "\n".join(rows)
