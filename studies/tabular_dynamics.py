"""Gradient dynamics of one configuration on one instance: exact expectations or sampled batches.

Both start at pi = pi_ref and take steps theta <- theta - eta grad L, L the configuration's
surrogate (an estimate of -J / beta). Each outer iteration fixes mu = pi (mu = pi_ref for
offline configurations), then takes ``steps_per_batch`` steps on the same batch.

- exact: the batch is all V^T sequences, each weighted by mu(y), so every step follows the
  expected gradient E_{y~mu}[grad L] (deterministic). The step on the row of prefix s is
  divided by d_mu(s), the probability that a sequence from mu starts with s: a positive
  per-prefix step size, which leaves the fixed points (zeros of the expected gradient)
  unchanged and lets rarely visited prefixes converge as fast as frequent ones. It stops when
  the first step of an iteration has max-norm below ``tol`` (a fixed point), or is not finite
  (diverged).
- sampled: ``batch_size`` sequences drawn from mu with a seeded generator; plain SGD.
"""

from __future__ import annotations

import math

import torch

from studies.tabular_configs import Batch, Config, surrogate
from studies.tabular_model import Instance, sequence_logprobs


def _behaviour(config: Config, instance: Instance, table: torch.Tensor) -> torch.Tensor:
    """mu at the start of a batch: pi_ref for offline configurations, else the current policy."""
    return instance.ref_table if config.offline else table.detach()


def _exact_batch(instance: Instance, table: torch.Tensor) -> Batch:
    space = instance.space
    tokens = space.sequences
    mu = sequence_logprobs(space, table).detach().exp()
    return Batch(tokens, space.rows(tokens), instance.reward, table.detach().clone(), len(mu) * mu, True)


def _sampled_batch(instance: Instance, table: torch.Tensor, batch_size: int, gen: torch.Generator) -> Batch:
    space = instance.space
    tokens = space.sample(table, batch_size, gen)
    rows = space.rows(tokens)
    reward = instance.reward[space.index(tokens)]
    ones = torch.ones(batch_size, dtype=table.dtype)
    return Batch(tokens, rows, reward, table.detach().clone(), ones, False)


def _visits(instance: Instance, table: torch.Tensor) -> torch.Tensor:
    """[n_rows, 1] d_mu(s), the probability that a sequence from the policy ``table`` has prefix s."""
    space = instance.space
    tokens = space.sequences
    mu = sequence_logprobs(space, table).detach().exp()
    visits = torch.zeros(space.n_rows, dtype=table.dtype)
    visits.index_add_(0, space.rows(tokens).flatten(), mu.repeat_interleave(space.length))
    return visits.unsqueeze(-1)


def _step(config, instance, table, batch, eta: float, scale: torch.Tensor | None = None) -> float:
    """One step theta <- theta - eta * scale * grad L in place; returns max |grad L|."""
    (grad,) = torch.autograd.grad(surrogate(config, instance, table, batch), table)
    with torch.no_grad():
        table -= eta * (grad if scale is None else scale * grad)
    return float(grad.abs().max())


def expected_gradient(config: Config, instance: Instance, table: torch.Tensor) -> torch.Tensor:
    """E_{y~mu}[grad L] at the policy ``table``, exactly; mu = pi (the first step of a batch) or pi_ref (offline)."""
    table = table.detach().clone().requires_grad_()
    batch = _exact_batch(instance, _behaviour(config, instance, table))
    (grad,) = torch.autograd.grad(surrogate(config, instance, table, batch), table)
    return grad


def _checkpoints(max_steps: int, n_points: int = 40) -> set[int]:
    """Steps (roughly log-spaced, always 0 and max_steps) at which the trajectory is recorded."""
    points = {0, max_steps}
    points |= {round(math.exp(i * math.log(max_steps) / n_points)) for i in range(n_points + 1)}
    return points


def run_exact(config: Config, instance: Instance, eta: float, max_steps: int, tol: float) -> dict:
    """Expected-gradient dynamics to a fixed point (or ``max_steps``); final metrics + trajectory."""
    table = instance.ref_table.clone().requires_grad_()
    record, trajectory = _checkpoints(max_steps), []
    step, converged, grad_norm = 0, False, math.inf
    while step < max_steps and not converged:
        mu = _behaviour(config, instance, table)
        batch = _exact_batch(instance, mu)
        scale = 1 / _visits(instance, mu).clamp_min(1e-300)
        for k in range(config.steps_per_batch):
            norm = _step(config, instance, table, batch, eta, scale)
            if k == 0:
                grad_norm = norm
            step += 1
            if step in record:
                trajectory.append({"step": step, **instance.metrics(table)})
        converged = grad_norm < tol
        if not math.isfinite(grad_norm):
            break
    final = instance.metrics(table)
    grad_at_opt = float(expected_gradient(config, instance, instance.optimum_table()).abs().max())
    return {
        "steps": step,
        "converged": converged,
        "grad_norm": grad_norm,
        "grad_at_opt": grad_at_opt,
        **final,
        "trajectory": trajectory,
    }


def run_sampled(
    config: Config, instance: Instance, eta: float, steps: int, batch_size: int, seed: int, n_points: int = 25
) -> dict:
    """Minibatch dynamics for ``steps`` gradient steps; metrics every steps / n_points steps.

    A run whose table stops being finite has diverged: its later metrics are NaN.
    """
    table = instance.ref_table.clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    every = max(1, steps // n_points)
    trajectory = [{"step": 0, "samples": 0, **instance.metrics(table)}]
    diverged = {key: math.nan for key in trajectory[0] if key not in ("step", "samples")}
    step = 0
    while step < steps:
        finite = bool(torch.isfinite(table).all())
        if finite:
            batch = _sampled_batch(instance, _behaviour(config, instance, table), batch_size, gen)
        for _ in range(min(config.steps_per_batch, steps - step)):
            if finite:
                _step(config, instance, table, batch, eta)
            step += 1
            if step % every == 0 or step == steps:
                samples = batch_size * math.ceil(step / config.steps_per_batch)
                metrics = instance.metrics(table) if finite else diverged
                trajectory.append({"step": step, "samples": samples, **metrics})
    return {**trajectory[-1], "trajectory": trajectory}
