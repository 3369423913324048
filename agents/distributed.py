"""Data-parallel PPOKL on torch.distributed, launched by ``torchrun --nproc_per_node W -m agents.ppo_kl``.

Each of the W ranks samples its own ``n_envs`` episodes (seed + rank: its own prompts and tokens)
and computes the loss of its share of every minibatch; all ranks then apply the same update:

- Gradient. Every PPO loss term is a token mean, so rank r's minibatch loss is L_r = S_r / n_r
  (S_r a sum over its n_r generated tokens). Scaling L_r by W n_r / n (n = sum_r n_r, one
  all-reduce of scalars) before backward and averaging the gradients over ranks gives
  grad(sum_r S_r / n): the gradient of the token mean over the union of the ranks' minibatches,
  which is what one process holding all W x n_envs episodes computes. Clipping runs after the
  average, on the global gradient.
- Metrics. Per-minibatch losses are token-weighted means over ranks (the union's values, so early
  stopping on ``target_kl`` agrees on every rank); rollout statistics are means over ranks (each
  has ``n_envs`` episodes) and throughputs are summed; explained variance uses global moments.
- KL controller. It sees the global KL and W x n_envs episodes, so beta is the same everywhere.
- Parameters are broadcast from rank 0 once; identical updates keep them equal. Rank 0 alone
  writes logs, evaluations and checkpoints.

Without ``WORLD_SIZE`` > 1 in the environment every function here is the single-process identity.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most 64 MB (float32)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...):
    NCCL for CUDA devices, gloo otherwise. Returns this rank's device (``cuda:LOCAL_RANK`` for
    CUDA, ``device`` unchanged otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_cuda = torch.device(device).type == "cuda"
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    if not on_cuda:
        return device
    local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    torch.cuda.set_device(local)
    return local


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, n_iterations: int = 0) -> int:
    """Seed of this rank's randomness: ``seed + rank`` for a fresh run; a resumed run (after
    ``n_iterations``) shifts by ``W x n_iterations`` so it does not replay earlier episodes."""
    return seed + rank() + world_size() * n_iterations


def broadcast_parameters(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (in flat buckets; a missing gradient is 0)."""
    if world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        bucket, size = [], 0
        while start < len(params) and (not bucket or size + params[start].numel() <= BUCKET_ELEMENTS):
            bucket.append(params[start])
            size += params[start].numel()
            start += 1
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= world_size()
        for p, chunk in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(chunk.view_as(p.grad))


def union_minibatch(losses: dict[str, torch.Tensor], n_tokens: torch.Tensor) -> tuple[float, dict[str, float]]:
    """``(weight, values)``: the factor W n_r / n for this rank's loss before backward, and each
    token-mean loss term over the union of the ranks' minibatches (``n_tokens`` = n_r)."""
    if world_size() == 1:
        return 1.0, {key: float(value.detach()) for key, value in losses.items()}
    local = n_tokens.double()
    sums = _global_sum(torch.stack([local] + [local * value.detach().double() for value in losses.values()]))
    total = sums[0]
    values = (sums[1:] / total).tolist()
    return float(local * world_size() / total), dict(zip(losses, values))


def global_rollout_stats(stats: dict[str, float], summed: Iterable[str] = ()) -> dict[str, float]:
    """Means over ranks of per-rank statistics (each rank has the same number of episodes);
    the keys in ``summed`` (throughputs) are added instead."""
    if world_size() == 1:
        return stats
    values = _global_sum(torch.tensor(list(stats.values()), dtype=torch.float64))
    summed = set(summed)
    return {key: value if key in summed else value / world_size() for key, value in zip(stats, values.tolist())}


def _global_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (moved to the GPU and back under NCCL)."""
    if world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    summed = values.to(device)
    dist.all_reduce(summed)
    return summed.to(values.device)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[y - y_hat] / Var[y] over the elements of all ranks (NaN if Var[y] = 0): global
    means first, then global centred sums of squares (two passes, float64, as ``np.var``)."""
    y = targets.double().flatten()
    residual = y - predictions.double().flatten()
    count = torch.tensor(float(y.numel()), dtype=torch.float64)
    count, y_sum, r_sum = _global_sum(torch.stack([count, y.sum(), residual.sum()])).tolist()
    squares = torch.stack([((y - y_sum / count) ** 2).sum(), ((residual - r_sum / count) ** 2).sum()])
    var_y, var_r = (_global_sum(squares) / count).tolist()
    return float("nan") if var_y == 0 else 1 - var_r / var_y


class IterationLimit(BaseCallback):
    """The callback of ranks other than 0: stop ``learn`` after ``iters`` PPO iterations (rank 0's
    ``TrainingMonitor`` stops at the same point, since the iteration count is the same)."""

    def __init__(self, iters: int):
        super().__init__()
        self.iters = iters

    def _on_step(self) -> bool:
        return self.model.n_iterations < self.iters

