"""Random per-token log-prob batches and comparisons shared by the framework-map tests.

``AGG`` is each framework's loss aggregation mode written out here, as the map's rows describe it.
"""

from __future__ import annotations

import torch


def random_logps(seed: int, B: int = 4, T: int = 5, dtype=torch.float64, spread: float = 2.0):
    """Per-token log-probs (requires grad), reference and behaviour log-probs, and a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    logps = (-spread * torch.rand(B, T, generator=g, dtype=dtype)).requires_grad_(True)
    ref = -spread * torch.rand(B, T, generator=g, dtype=dtype)
    old = logps.detach() + 0.6 * (torch.rand(B, T, generator=g, dtype=dtype) - 0.5)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    return logps, ref, old, mask


def assert_same(theirs, ours, logps, mask, rtol=1e-12, atol=1e-12, value=True, gradient=True):
    """Equal per-token values (where mask) and equal gradients of the masked sums."""
    if value:
        torch.testing.assert_close(theirs[mask].double(), ours[mask].double(), rtol=rtol, atol=atol)
    if not gradient:
        return
    (g_theirs,) = torch.autograd.grad((theirs * mask).sum(), logps)
    (g_ours,) = torch.autograd.grad((ours * mask).sum(), logps)
    torch.testing.assert_close(g_theirs.double(), g_ours.double(), rtol=rtol, atol=atol)


AGG = {
    "token-mean": lambda x, m: (x * m).sum() / m.sum(),
    "token-sum": lambda x, m: (x * m).sum(),
    "seq-mean-token-sum": lambda x, m: (x * m).sum(-1).mean(),
    "seq-mean-token-sum-norm": lambda x, m: (x * m).sum(-1).mean() / m.shape[-1],
    "seq-mean-token-mean": lambda x, m: ((x * m).sum(-1) / m.sum(-1)).mean(),
}
