"""Convergence of one loop's state sequence: step sizes, contraction ratios, residuals and the a-posteriori bound.

A state sequence is `h_0, h_1, ..., h_T`, given either as a tensor `[T+1, B, d]` or as a list of `[B, d]`
tensors; statistics are per loop and per sample, so the result of each function is `[loops, B]`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

States = Union[torch.Tensor, Sequence[torch.Tensor]]


def stack_states(states: States) -> torch.Tensor:
    """Stack a state sequence into a floating tensor `[T+1, B, d]`, flattening any trailing state dims."""
    h = states if isinstance(states, torch.Tensor) else torch.stack(list(states))
    if h.dim() < 3:
        raise ValueError(f"states: expected [T+1, B, d] (or a list of [B, d]), got shape {tuple(h.shape)}")
    h = h.detach().flatten(2)
    return h if h.is_floating_point() else h.float()


def steps(states: States) -> torch.Tensor:
    """Loop updates `Δ_t = h_t − h_{t−1}` for t = 1..T, shape `[T, B, d]`."""
    h = stack_states(states)
    return h[1:] - h[:-1]


def step_norms(states: States) -> torch.Tensor:
    """Update sizes `‖Δ_t‖` for t = 1..T, shape `[T, B]`."""
    return steps(states).norm(dim=-1)


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """`num / den`, with NaN where `den` is zero, so an exactly converged loop is skipped rather than read as 0/0."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, float("nan")))


def contraction_ratios(states: States, floor: float = 0.0) -> torch.Tensor:
    """Empirical per-loop contraction `‖Δ_{t+1}‖ / ‖Δ_t‖`, `[T−1, B]`; a contraction keeps it below κ.

    Ratios whose denominator `‖Δ_t‖` is at most `floor·‖h_t‖` are NaN: once updates reach rounding noise their
    ratio measures the arithmetic, not the map.
    """
    h = stack_states(states)
    n = (h[1:] - h[:-1]).norm(dim=-1)
    den = torch.where(n[:-1] > floor * h[1:-1].norm(dim=-1), n[:-1], torch.zeros_like(n[:-1]))
    return safe_ratio(n[1:], den)


def relative_residuals(states: States) -> torch.Tensor:
    """Relative latent change `‖Δ_t‖ / ‖h_t‖`, `[T, B]` (the exit criterion of Huginn, arXiv 2502.05171)."""
    h = stack_states(states)
    return safe_ratio((h[1:] - h[:-1]).norm(dim=-1), h[1:].norm(dim=-1))


def aposteriori_bound(states: States, kappa: float, h_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Banach a-posteriori bound `κ/(1−κ)·‖h_t − h_{t−1}‖` and true distance `‖h_t − h*‖`, both `[T, B]`.

    `h_star` `[B, d]` (or one `[d]` for all) is a far-converged state; a valid certificate gives
    bound ≥ distance at every loop.
    """
    if not 0.0 <= kappa < 1.0:
        raise ValueError(f"kappa={kappa}: the a-posteriori bound needs 0 <= kappa < 1")
    h = stack_states(states)
    bound = kappa / (1.0 - kappa) * (h[1:] - h[:-1]).norm(dim=-1)
    dist = (h[1:] - h_star.detach().to(h.dtype).reshape(-1, h.shape[-1])).norm(dim=-1)
    return bound, dist
