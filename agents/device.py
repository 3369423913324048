"""Device and numeric precision, written once for every device (CPU, CUDA, ...).

- ``device_error``: why a ``--device`` cannot be used on this machine (None if it can);
  ``precision_warning``: bfloat16 asked for on a CPU that only emulates it.
- Mixed precision for the trained policy: its LM's forward runs under ``torch.autocast`` on the
  device of its parameters, so matrix products run in bfloat16 while the weights, the AdamW
  state and the updates stay float32 (a 1e-6 learning rate is below bfloat16's resolution of
  2^-8 relative, so bfloat16 master weights would not move). Logits are cast to float32 before
  every log-softmax and KL (``CausalLMPolicy.sequence_forward``, ``lmgym.decoding``).
- ``fp32_output_layer`` (``--cast-lm-head-to-fp32``): the output layer of the policy and of the
  reference in float32 under autocast; bfloat16 logits are the main error of the KL under bf16.
- The frozen reference model never updates, so it can simply hold bfloat16 weights
  (``cast_frozen``): half the memory, logits still returned in float32.
- Activation (gradient) checkpointing of the policy's decoder layers: each layer's activations
  are recomputed in the backward pass instead of being kept, trading one more forward for
  O(layers x tokens x hidden) memory.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from agents.options import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # float32, bfloat16


def device_error(device: str) -> str | None:
    """A one-line reason why ``device`` is unusable here, or None."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            return f"--device {device}: CUDA is not available on this machine (torch {torch.__version__} with {build})"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available on this machine"
    elif parsed.type not in ("cpu", "cuda", "mps"):
        return f"--device: {device!r} is not supported (cpu, cuda, cuda:N or mps)"
    return None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bfloat16 natively


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU multiplies bfloat16 natively (a flag of ``BF16_CPU_FLAGS`` in
    ``/proc/cpuinfo``); None where that cannot be read (not Linux, or not x86).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``; None reads it.

    Returns:
        True or False on Linux x86, else None.
    """
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()  # noqa: SIM115 (a one-shot read)
        except OSError:
            return None
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    if not flags:
        return None
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def precision_warning(device: str, dtype: str, cpuinfo: str | None = None) -> str | None:
    """A one-line warning when ``dtype`` is bfloat16 on a CPU that only emulates it, else None.

    Measured on a 2-core AMD EPYC with AVX2 and no AVX-512 (torch 2.13, one thread,
    ``bench/bench_bf16_cpu.py``): a forward and backward of SmolLM2-135M over 8 x 48 tokens took
    16.8x as long under bfloat16 autocast as in float32, sampling 8 tokens 2.5x (docs/benchmarks.md).

    Args:
        device: the ``--device`` (only ``cpu`` is checked).
        dtype: the ``--dtype``.
        cpuinfo: the text of ``/proc/cpuinfo``; None reads it.

    Returns:
        The warning, or None.
    """
    if dtype != "bfloat16" or torch.device(device).type != "cpu" or cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return ("warning: --dtype bfloat16 on a CPU without native bfloat16 (no avx512_bf16 or amx_bf16 flag): its matrix "
            "products are emulated (measured 17x slower than float32 for a forward and backward); use --dtype float32 here")


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named ``dtype``, or a ValueError naming the argument."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def autocast_forward(module: nn.Module, dtype: torch.dtype) -> None:
    """Make ``module``'s forward run under ``torch.autocast(dtype)`` on its parameters' device
    (looked up at each call, so ``module.to(device)`` afterwards is fine)."""
    forward = module.forward

    @functools.wraps(forward)
    def autocast_forward_call(*args, **kwargs):
        device_type = next(module.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = autocast_forward_call


def fp32_output_layer(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model``'s output layer run in float32 outside any autocast (idempotent; TRL's
    ``cast_lm_head_to_fp32``): logits = float32(h) float32(W)^T (+ bias).

    Under bfloat16 autocast the output layer's bfloat16 logits dominate the KL's error
    (bench/bench_precision.py: about 10x the error of a bfloat16 trunk with a float32 head on
    SmolLM2-135M). A weight stored in half precision (a ``cast_frozen`` reference) is upcast at
    each call; the float32 master weights of a trained policy are used as they are, so the
    gradient reaches them unchanged (tied input embeddings included).
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_agents_fp32", False):
        return model
    forward = head.forward

    @functools.wraps(forward)
    def float32_forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = float32_forward
    head._agents_fp32 = True
    return model


def cast_frozen(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Store a frozen model's weights in ``dtype`` (it is never updated, so no master copy)."""
    model.to(dtype)


def enable_activation_checkpointing(lm: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing)."""
    lm.activation_checkpointing_enable()


def checkpointed_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers whose activations are recomputed in backward."""
    return [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def set_checkpointing_active(lm: nn.Module, active: bool) -> None:
    """Transformers checkpoints a layer only while that layer is in training mode; flip only the
    layers' own flag (not their children's), so dropout inside them stays off."""
    for layer in checkpointed_layers(lm):
        layer.training = active
