"""A fingerprint of a model's weights: SHA-256 over every entry of its ``state_dict`` (sorted by
name: the name, dtype, shape and raw bytes), so that two models have the same fingerprint exactly
when they hold the same tensors bit for bit. A checkpoint records those of the reference model
and of the initial policy; ``--resume`` refuses a model whose weights changed since."""
from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of ``module``'s state dict: names, dtypes, shapes and bytes.

    Args:
        module: any torch module (its buffers count as well as its parameters).

    Returns:
        64 hexadecimal characters.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
