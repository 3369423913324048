"""LoRA through ``peft``: the policy trains low-rank adapters; the reference is the same network
with the adapters switched off, so one copy of the base weights serves both.

With adapters W + (alpha / r) B A on every linear layer (B initialised to 0), pi_theta equals
pi_ref exactly at initialisation and the analytic KL(pi_theta || pi_ref) compares two forwards of
one network, with and without the adapters. Only A and B (and the value head) are trained.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


def add_lora(lm: PreTrainedModel, rank: int, alpha: float | None = None) -> None:
    """Attach rank-``rank`` LoRA adapters (scale ``alpha / rank``, default alpha = 2 rank) to every
    linear layer of ``lm`` but its output head, and freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional dependency, only needed with LoRA
    except ImportError as error:
        raise ValueError("lora_rank needs the peft package: pip install peft") from error
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules="all-linear")
    inject_adapter_in_model(config, lm)
    for name, parameter in lm.named_parameters():
        parameter.requires_grad_("lora_" in name)


def _adapter_layers(lm: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in lm.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(lm: PreTrainedModel) -> Iterator[None]:
    """Run ``lm`` as its base model inside the block (adapters on again afterwards)."""
    layers = _adapter_layers(lm)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class BaseModelView(nn.Module):
    """The reference model: ``lm`` called with its adapters off. It holds no parameters of its own
    (``lm`` is not a submodule), so freezing or moving the view cannot touch the policy."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.__dict__["lm"] = lm
        self.config = lm.config

        @functools.wraps(lm.forward)  # lm's signature: IncrementalDecoder reads the cache argument's name
        def forward(*args, **kwargs):
            with torch.no_grad(), adapters_disabled(lm):
                return lm(*args, **kwargs)

        self.forward = forward

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        """``lm``'s decoder, whose forward runs (adapters off) inside this view's."""
        return self.lm.get_decoder()


def share_base_as_reference(model: Any, envs: list) -> None:
    """Make the LoRA policy's base (its LM with the adapters off) the reference of the agent
    ``model`` (a PPOKL) and of each lmgym env in ``envs``, dropping the copy they loaded."""
    view = BaseModelView(model.policy.lm)
    model.use_reference(view)
    for env in envs:
        env.set_reference_model(view)
