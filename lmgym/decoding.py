"""Incremental decoding of a left-padded batch with a causal LM and its KV cache.

With left padding, row ``b`` of ``input_ids`` is ``[pad]*k_b + tokens_b``. The model must see
``tokens_b`` at positions ``0, 1, ...`` and never attend to the pads; then its next-token logits
equal those of an unpadded forward over ``tokens_b`` alone. Positions come from the attention mask:
``position_ids = cumsum(mask) - 1`` (clamped at 0 on the pads, whose outputs are never used).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` mask -> ``[B, L]`` long positions: ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def contiguous_output_layer(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model``'s output layer receive contiguous hidden states (idempotent; values unchanged).

    With ``logits_to_keep`` a causal LM feeds its output layer a strided slice ``h[:, -k:]`` of the
    hidden states; a Linear on such a 3-D view runs as a batched multiply with the weight expanded
    per row, 7x slower on CPU than the same product on a contiguous copy (measured with
    SmolLM2's 49,152 x 576 output layer, 24 rows).
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_lmgym_contiguous_input", False):
        head.register_forward_pre_hook(lambda module, args: tuple(a.contiguous() for a in args))
        head._lmgym_contiguous_input = True
    return model


def forward_last(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, **kwargs):
    """``model``'s output over a left-padded batch with the logits of the last ``n`` positions only
    (positions from the mask; no cache). ``kwargs`` go to the model, e.g. ``output_hidden_states``."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n,
        use_cache=False,
        **kwargs,
    )


@torch.no_grad()
def sequence_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[B, n, V]``: ``model``'s next-token logits for the last ``n`` tokens of each row of a
    left-padded batch (entry ``[b, j]`` predicts ``input_ids[b, L - n + j]`` from the tokens before
    it), in one forward. Positions masked out on the right are allowed; their logits are
    meaningless and the positions before them are unaffected."""
    return forward_last(model, input_ids, attention_mask, n + 1).logits[:, :-1].float()


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, V] float32 next-token logits at the last position
    hidden: torch.Tensor | None  # [B, H] final-layer hidden state at the last position, or None


class IncrementalDecoder:
    """Runs a causal LM over a left-padded batch, carrying its KV cache across steps.

    ``prefill`` encodes the whole prefix once; each ``append`` feeds one new token per row and
    costs one forward of length 1. Both run under ``torch.no_grad()`` (not inference mode, so
    callers may reuse the returned tensors in autograd).
    """

    def __init__(self, model: PreTrainedModel, output_hidden: bool = False):
        self.model = contiguous_output_layer(model)
        self.output_hidden = output_hidden
        # transformers >= 5.24 names the cache argument `cache`; earlier versions `past_key_values`.
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # [B, cached length + appended]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderOutput:
        """Encode a ``[B, L]`` left-padded batch, store its cache, return the output at position L-1."""
        self.attention_mask = attention_mask.to(self.device, torch.long)
        self.cache = DynamicCache(config=self.model.config)
        return self._forward(input_ids.to(self.device), position_ids_from_mask(self.attention_mask))

    @torch.no_grad()
    def append(self, token_ids: torch.Tensor) -> DecoderOutput:
        """Feed one ``[B]`` token per row (all unmasked) using the cache; return the new output."""
        if self.cache is None:
            raise RuntimeError("call prefill() before append()")
        positions = self.attention_mask.sum(-1, keepdim=True)  # next position of each row
        ones = torch.ones_like(positions)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        return self._forward(token_ids.to(self.device).view(-1, 1), positions)

    @property
    def can_replace_rows(self) -> bool:
        """True once prefilled, if every cache layer keeps the whole history as ``keys``/``values``
        tensors (transformers >= 4.56 without sliding windows)."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and not any(getattr(layer, "is_sliding", True) for layer in layers)

    @torch.no_grad()
    def replace_rows(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderOutput:
        """Encode a ``[R, L]`` left-padded batch as the new contents of cached ``rows`` (the other
        rows keep their cache); return the output at position L-1 of those R rows.

        The R rows are encoded alone and their keys/values spliced into the batch cache, left-padded
        (or the batch cache left-padded) to the longer length; columns that are padding in every
        row are then dropped, so the cache never grows past the longest live sequence.
        """
        if not self.can_replace_rows:
            raise RuntimeError("replace_rows needs a prefilled cache of full-history layers (see can_replace_rows)")
        new = IncrementalDecoder(self.model, self.output_hidden)
        out = new.prefill(input_ids, attention_mask)
        rows = rows.to(self.device)
        length = max(self.attention_mask.shape[1], new.attention_mask.shape[1])
        self.attention_mask = _splice(self.attention_mask, rows, new.attention_mask, length, dim=1)
        for layer, new_layer in zip(self.cache.layers, new.cache.layers):
            layer.keys = _splice(layer.keys, rows, new_layer.keys, length, dim=2)
            layer.values = _splice(layer.values, rows, new_layer.values, length, dim=2)
        self._drop_padding_columns()
        return out

    def _drop_padding_columns(self) -> None:
        used = self.attention_mask.any(dim=0)
        first = int(used.long().argmax()) if bool(used.any()) else 0
        if first:
            self.attention_mask = self.attention_mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> DecoderOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: self.cache},
            output_hidden_states=self.output_hidden,
            logits_to_keep=1,
        )
        hidden = out.hidden_states[-1][:, -1].float() if self.output_hidden else None
        return DecoderOutput(logits=out.logits[:, -1].float(), hidden=hidden)


class LockstepDecoder:
    """Several causal LMs decoding the same left-padded batch in lockstep, each with its own KV cache.

    ``outputs`` holds every model's ``DecoderOutput`` at the current state, in ``models``' order
    (``output_hidden[i]``: model i also gives its final hidden state); ``append(tokens)`` feeds the
    same ``[B]`` tokens to every model (one forward of length 1 each) and moves to the next state.
    The one decode loop of the project: PPOKL's sampler (policy and NLPO's masking policy) and the
    studies' samplers (policy, reference and behaviour policy) all step through it.
    """

    def __init__(self, models: list[PreTrainedModel], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 output_hidden: tuple[bool, ...] = ()):
        """Prefill every model with the prefix.

        Args:
            models: the causal LMs, each on its own device.
            input_ids: ``[B, L]`` left-padded prefix.
            attention_mask: ``[B, L]``, 0 on the padding.
            output_hidden: per model (missing: False), whether its outputs carry final hidden states.
        """
        hidden = tuple(output_hidden) + (False,) * (len(models) - len(output_hidden))
        self.decoders = [IncrementalDecoder(model, output_hidden=h) for model, h in zip(models, hidden)]
        self.outputs: list[DecoderOutput] = [decoder.prefill(input_ids, attention_mask) for decoder in self.decoders]

    def append(self, tokens: torch.Tensor) -> list[DecoderOutput]:
        """Feed ``tokens`` [B] to every model; return (and keep as ``outputs``) their new outputs."""
        self.outputs = [decoder.append(tokens) for decoder in self.decoders]
        return self.outputs


def decode_in_lockstep(
    models: list[PreTrainedModel],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    choose: Callable[[list[DecoderOutput]], torch.Tensor],
    output_hidden: tuple[bool, ...] = (),
) -> Iterator[tuple[list[DecoderOutput], torch.Tensor, torch.Tensor]]:
    """Continue a left-padded batch with several causal LMs in lockstep (``LockstepDecoder``).

    At each step ``choose(outputs)`` picks the next token of every row [B] from the models' outputs
    at the current state; yields ``(outputs, tokens, active)``, ``active`` [B] bool marking the rows
    still in their continuation before this token. Stops after ``max_new_tokens`` tokens or once
    every row has written ``eos_id``; every model then sees the chosen tokens.

    Args:
        models: the causal LMs.
        input_ids: ``[B, L]`` left-padded prompts.
        attention_mask: ``[B, L]``, 0 on the padding.
        max_new_tokens: the most tokens to continue with.
        eos_id: the token that ends a row's continuation, or None.
        choose: the outputs at the current state -> the next tokens [B].
        output_hidden: per model, whether its outputs carry final hidden states.

    Returns:
        An iterator over ``(outputs, tokens, active)``, one per step.
    """
    lockstep = LockstepDecoder(models, input_ids, attention_mask, output_hidden)
    active = torch.ones(input_ids.shape[0], dtype=torch.bool)
    for t in range(max_new_tokens):
        tokens = choose(lockstep.outputs)
        yield lockstep.outputs, tokens, active.clone()
        if eos_id is not None:
            active &= tokens.cpu() != eos_id
        if not active.any() or t + 1 == max_new_tokens:
            return
        lockstep.append(tokens)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros prepended along ``dim`` up to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _splice(batch: torch.Tensor, rows: torch.Tensor, new: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``batch`` with ``rows`` (dim 0) replaced by ``new``, both left-padded to ``length`` along ``dim``."""
    return _left_pad(batch, length, dim).index_copy(0, rows, _left_pad(new, length, dim))
