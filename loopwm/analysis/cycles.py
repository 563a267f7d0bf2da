"""Oscillation in a loop's state sequence: step-direction cosines, lag distances, recurrence plots, cycle periods.

Looped models can settle into a cycle instead of a point (cyclic fixed points, arXiv 2604.11791; the oscillating
updates past the sweet spot of LoopCoder-v2, arXiv 2606.18023). A cosine near −1 between successive updates is
the signature of a 2-cycle; a period found by `detect_period` names it.
"""

from __future__ import annotations

import torch

from loopwm.analysis.convergence import States, stack_states


def step_cosines(states: States, floor: float = 0.0) -> torch.Tensor:
    """Cosine between successive updates `cos(Δ_t, Δ_{t−1})` for t = 2..T, `[T−1, B]`: +1 steady, −1 flipping.

    Entries where either update is at most `floor·‖h_t‖` are NaN: the direction of rounding noise means nothing.
    """
    h = stack_states(states)
    d = h[1:] - h[:-1]
    n = d.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(d[1:], d[:-1], dim=-1, eps=1e-30)
    resolved = torch.minimum(n[1:], n[:-1]) > floor * h[1:-1].norm(dim=-1)
    return torch.where(resolved, cos, torch.full_like(cos, float("nan")))


def recurrence_matrix(states: States) -> torch.Tensor:
    """Pairwise distances `‖h_i − h_j‖` between all loops of each sample, `[B, T+1, T+1]` (a recurrence plot)."""
    h = stack_states(states).transpose(0, 1)
    return torch.cdist(h, h)


def lag_distances(states: States, max_lag: int) -> torch.Tensor:
    """Tail recurrence `max_{t in last k loops} ‖h_t − h_{t−k}‖ / ‖h_T‖` per lag k = 1..max_lag, `[max_lag, B]`.

    Taking the worst case over the last k loops makes a period-k orbit read near 0 at lag k and its multiples only.
    """
    h = stack_states(states)
    n = h.shape[0]
    if not 1 <= max_lag <= n // 2:
        raise ValueError(f"max_lag={max_lag}: need 1 <= max_lag <= {n // 2} for {n} states")
    scale = h[-1].norm(dim=-1).clamp_min(1e-12)
    rows = [(h[n - k :] - h[n - 2 * k : n - k]).norm(dim=-1).amax(0) / scale for k in range(1, max_lag + 1)]
    return torch.stack(rows)


def detect_period(states: States, max_period: int = 8, tol: float = 1e-3) -> torch.Tensor:
    """Smallest period k ≤ `max_period` whose relative tail recurrence is below `tol`, `[B]` long.

    1 means a fixed point, 2 a 2-cycle and so on; 0 means no cycle of period up to `max_period` was reached.
    """
    close = lag_distances(states, max_period) <= tol
    return torch.where(close.any(0), close.long().argmax(0) + 1, torch.zeros_like(close[0], dtype=torch.long))
