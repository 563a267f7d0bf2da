"""Long-horizon behaviour of latent rollouts: a Lyapunov-like divergence rate of two nearby trajectories."""

from __future__ import annotations

import math

import torch


def lyapunov_rate(
    traj_a: torch.Tensor, traj_b: torch.Tensor, floor: float = 1e-12, ceiling: float = math.inf
) -> torch.Tensor:
    """Least-squares slope of `log‖δ_t‖` against horizon t for two rollouts `[H, B, d]`, per sample `[B]`.

    Negative means nearby latents converge (a contracting imagination), positive that errors compound. The fit
    stops at the first step where `‖δ_t‖` leaves (floor, ceiling): below, rounding noise; above, the divergence
    has saturated at the size of the attractor. A sample with fewer than two steps in the window gets NaN.
    """
    if traj_a.shape != traj_b.shape:
        raise ValueError(f"lyapunov_rate: trajectories differ in shape, {tuple(traj_a.shape)} vs {tuple(traj_b.shape)}")
    delta = (traj_a.detach() - traj_b.detach()).flatten(2).double().norm(dim=-1)
    w = ((delta > floor) & (delta < ceiling)).double().cumprod(0)
    y = torch.where(w > 0, delta, torch.ones_like(delta)).log()
    t = torch.arange(delta.shape[0], dtype=torch.float64).unsqueeze(1).expand_as(delta)
    n = w.sum(0)
    t_mean = (w * t).sum(0) / n.clamp_min(1)
    y_mean = (w * y).sum(0) / n.clamp_min(1)
    cov = (w * (t - t_mean) * (y - y_mean)).sum(0)
    var = (w * (t - t_mean) ** 2).sum(0)
    slope = torch.where((n >= 2) & (var > 0), cov / var.clamp_min(1e-30), torch.full_like(cov, float("nan")))
    return slope.float()
