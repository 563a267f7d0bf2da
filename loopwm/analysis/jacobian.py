"""Matrix-free, per-sample estimates of a loop map's Jacobian: spectral norm, spectral radius, Frobenius norm.

The map `f` takes a batch `[B, d]` to `[B, d]` with rows processed independently, so one JVP or VJP with a
batched tangent gives every sample's `J_b v_b` at once. These are the diagnostics of DEQ / monotone equilibrium
networks and of STARS (arXiv 2605.26733), which tracks the loop Jacobian's spectral radius.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import jvp, vjp

Map = Callable[[torch.Tensor], torch.Tensor]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _start(h: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    v = torch.randn(h.shape, generator=generator, dtype=h.dtype, device="cpu").to(h.device)
    return _unit(v)


def spectral_norm(
    f: Map, h: torch.Tensor, iters: int = 30, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Largest singular value `‖J_f(h_b)‖_2` per sample `[B]`, by power iteration on `JᵀJ` (a JVP and a VJP a step)."""
    h = h.detach()
    _, pullback = vjp(f, h)
    v = _start(h, generator)
    sigma = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(iters):
        jv = jvp(f, (h,), (v,))[1]
        sigma = jv.norm(dim=-1)
        v = _unit(pullback(jv)[0])
    return sigma.detach()


def spectral_radius(
    f: Map, h: torch.Tensor, iters: int = 60, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Spectral radius `ρ(J_f(h_b))` per sample `[B]`, by power iteration on `J` (Gelfand: ρ = lim ‖Jᵏv‖^{1/k}).

    The growth factor is averaged geometrically over the second half of the iterations, which also converges
    when the dominant eigenvalues are a complex pair (a rotation), where the plain Rayleigh ratio oscillates.
    """
    h = h.detach()
    v = _start(h, generator)
    log_growth = []
    for _ in range(iters):
        jv = jvp(f, (h,), (v,))[1]
        n = jv.norm(dim=-1)
        log_growth.append(n.clamp_min(1e-30).log())
        v = jv / n.clamp_min(1e-30).unsqueeze(-1)
    tail = torch.stack(log_growth[iters // 2 :])
    return tail.mean(0).exp().detach()


def hutchinson_frobenius(
    f: Map, h: torch.Tensor, probes: int = 8, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Hutchinson estimate of `‖J_f(h_b)‖_F² / d` per sample `[B]`: mean of `‖vᵀJ‖²/d` over Rademacher probes `v`."""
    h = h.detach()
    _, pullback = vjp(f, h)
    d = h[0].numel()
    total = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(probes):
        v = torch.randint(0, 2, h.shape, generator=generator).to(h) * 2 - 1
        total += pullback(v)[0].flatten(1).pow(2).sum(-1)
    return (total / (probes * d)).detach()
