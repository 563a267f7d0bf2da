"""The loop's certificate in the dtype it runs in: κ from the applied parameters, and rounding-safe bounds.

For the map F(h) = Ā⊙h + D + R(h) that the loop applies (Ā, the drive D = B̄e and the h-path weights
as computed, the last one times the gain s), κ = max Ā + Π_i L_i with L_i ≥ ‖W_i‖₂ bounds Lip_h(F).
The loop computes F̂ ≠ F in floating point. If ‖F̂(h) − F(h)‖ ≤ ρ(h), then for h_t = F̂(h_{t−1})

    ‖h_t − h*‖ ≤ ‖F̂(h_{t−1}) − F(h_{t−1})‖ + κ‖h_{t−1} − h*‖ ≤ ρ + κ(d + ‖h_t − h*‖),  d = ‖h_t − h_{t−1}‖,

so ‖h_t − h*‖ ≤ (κ·d + ρ)/(1 − κ) (`LoopCertificate.step_bound`): the a-posteriori bound plus a
rounding term. Where ρ dominates, more loops cannot lower it; there ‖h − h*‖ ≤ ‖F(h) − h‖/(1 − κ)
with F(h) evaluated in float64 (`LoopCertificate.residual_bound`, rounding ρ₆₄ included) certifies
what the float32 state really is, typically to ~1e-6 instead of the worst case's ~1e-3.

ρ follows the block's h-path as a chain of stages x_i = φ(W_i x_{i−1} + c_i), x_0 = h, out = D + x_S,
with the standard model of floating-point arithmetic only: a matrix product with inner dimension n
errs by at most γ_{n+1}(|c| + |W||x|) elementwise (γ_n = nu/(1 − nu), any summation order), so by
γ_{n+1}(‖c‖ + ‖|W|‖₂‖x‖) in norm; an elementwise operation by u relative; the activation by c_φ·u
relative (relu 0, leaky_relu 1, tanh 4: library tanh within 2 ulp). With e_i the error of x_i and
a_i ≥ ‖x_i‖ (φ is 1-Lipschitz with |φ(y)| ≤ |y|):

    δ_i = γ_{n_i+1}(C_i + A_i(a_{i−1} + e_{i−1})) + τ_i,   y_i ≤ L_i(a_{i−1} + e_{i−1}) + C_i + δ_i,
    e_i = L_i e_{i−1} + δ_i + c_φ u y_i,                   a_i = L_i a_{i−1} + C_i,

where C_i bounds the stage's additive term (the sum of the injection's norms; plus ‖D‖ at the last
stage), A_i ≥ ‖|W_i|‖₂ and τ_i allows for underflow. The output sum and the retention update add at
most 2u(1 + u)(‖D‖ + a_S + e_S + max Ā‖h‖). Every norm is computed in the loop's dtype and rounded up
by its own γ; the bound is assembled in float64 and rounded up to the loop's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from loopwm.lipschitz import Certified, gamma, unit_roundoff

ACTIVATION_ROUNDOFF = {"relu": 0.0, "leaky_relu": 1.0, "tanh": 4.0}
"""c_φ: an activation's rounding error in units of u, relative to its output."""

FLOAT64_SLACK = 1 + gamma(64, torch.float64)
"""Covers the float64 operations that assemble one bound (fewer than 64 on any path)."""


def matmul_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The relative error of a matmul's inputs on top of γ_n: nonzero where CUDA multiplies float32 in TF32/bf16."""
    if device.type != "cuda" or dtype != torch.float32:
        return 0.0
    return {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]


def norm_bounds(x: Tensor) -> Tensor:
    """Per-sample Euclidean norms (float64), rounded up for their computation in x's dtype."""
    flat = x.detach().reshape(x.shape[0], -1)
    return flat.norm(dim=-1).to(torch.float64) * (1 + gamma(flat.shape[1] + 2, x.dtype))


@dataclass(frozen=True)
class LoopCertificate:
    """κ and the per-stage constants of the rounding term, computed from the parameters the loop applies."""

    kappa: Tensor  # float64: max Ā + Π L_i
    max_retention: float  # max Ā
    lips: tuple[float, ...]  # L_i ≥ ‖W_i‖₂ of each applied h-path weight
    abs_norms: tuple[float, ...]  # A_i ≥ ‖|W_i|‖₂
    inner: tuple[int, ...]  # n_i: each weight's input width (a matmul's inner dimension)
    entries: tuple[int, ...]  # output entries per sample of each stage (for the underflow allowance)
    activation: str
    dtype: torch.dtype  # the loop's
    device: torch.device
    loop_rounding: tuple[float, ...] = field(init=False)  # ρ's coefficients for F in `dtype`
    float64_rounding: tuple[float, ...] = field(init=False)  # and for F evaluated in float64

    def __post_init__(self) -> None:
        object.__setattr__(self, "loop_rounding", self.rounding_coefficients(self.dtype))
        object.__setattr__(self, "float64_rounding", self.rounding_coefficients(torch.float64))

    @classmethod
    def build(
        cls, retention: Tensor, scale: Tensor, weights: Sequence[Certified], activation: str
    ) -> tuple["LoopCertificate", Tensor]:
        """The certificate for h-path weights `weights` whose last map the loop multiplies by `scale`.

        Returns it with the last weight as applied, fl(W_S·s), whose norm is ≤ s(‖W_S‖₂ + u‖|W_S|‖₂).
        """
        last = weights[-1].weight * scale
        u = unit_roundoff(last.dtype)
        s = abs(float(scale.detach()))
        up = 1 + 2.0**-51  # the float64 products below
        out_lip, out_abs = float(weights[-1].lip), float(weights[-1].abs_norm)
        lips = [float(c.lip) for c in weights[:-1]] + [s * (out_lip + u * out_abs) * up]
        abs_norms = [float(c.abs_norm) for c in weights[:-1]] + [s * out_abs * (1 + u) * up]
        inner, entries, count = [], [], retention.shape[0]
        for c in weights:
            out_features, in_features = c.weight.shape[0], c.weight.reshape(c.weight.shape[0], -1).shape[1]
            count = count * out_features // in_features
            inner.append(in_features)
            entries.append(count)
        a_max = float(retention.detach().max())
        product = 1.0
        for lip in lips:
            product *= lip
        kappa = torch.tensor(
            (a_max + product) * (1 + gamma(len(lips) + 2, torch.float64)), dtype=torch.float64, device=last.device
        )
        return cls(
            kappa,
            a_max,
            tuple(lips),
            tuple(abs_norms),
            tuple(inner),
            tuple(entries),
            activation,
            last.dtype,
            last.device,
        ), last

    def rounding_coefficients(self, dtype: torch.dtype) -> tuple[float, ...]:
        """(c_0, c_h, c_C, c_D) with ρ = c_0 + c_h‖h‖ + c_C·C + c_D‖D‖ for F evaluated in `dtype`: the stage
        recursion is affine with nonnegative coefficients, so it is run once on coefficient vectors."""
        u, tiny = unit_roundoff(dtype), torch.finfo(dtype).tiny
        extra = matmul_roundoff(dtype, self.device)
        act = ACTIVATION_ROUNDOFF[self.activation] * u
        one, h, context, drive = torch.eye(4, dtype=torch.float64)
        a, err = h, torch.zeros(4, dtype=torch.float64)
        last = len(self.lips) - 1
        for i, (lip, abs_norm, n, m) in enumerate(zip(self.lips, self.abs_norms, self.inner, self.entries)):
            add = context + drive if i == last else context
            computed = a + err
            delta = (gamma(n + 1, dtype) + extra * (2 + extra)) * (add + abs_norm * computed) + m * (n + 2) * tiny * one
            pre = lip * computed + add + delta
            err = lip * err + delta + act * pre
            a = lip * a + add
        return tuple((err + 2 * u * (1 + u) * (drive + a + err + self.max_retention * h)).tolist())

    def rounding(self, h: Tensor, context: Tensor, drive: Tensor, dtype: torch.dtype) -> Tensor:
        """ρ ≥ ‖F̂(h) − F(h)‖ (float64, per sample) for F evaluated in `dtype`, from norm bounds of h, the
        injection terms (summed) and the drive."""
        return _affine(self.rounding_coefficients(dtype), h, context, drive)

    def step_bound(self, step_norm: Tensor, h: Tensor, context: Tensor, drive: Tensor) -> tuple[Tensor, Tensor]:
        """(κ·d + ρ)/(1 − κ) per sample (float64) for a state of norm ≤ `h` reached by a step of norm
        `step_norm`, and whether ρ dominates (ρ ≥ κ·d: more loops cannot lower it). `context` and `drive`
        bound the summed injection terms' and the drive's norms; all norms as from `norm_bounds`."""
        kappa = float(self.kappa)
        width = self.entries[-1]  # the state's: the step norm sums `width` squares of rounded differences
        d = step_norm.detach().to(torch.float64) * (1 + gamma(width + 3, self.dtype))
        if kappa >= 1.0:
            return torch.full_like(d, float("inf")), torch.zeros_like(d, dtype=torch.bool)
        rho = _affine(self.loop_rounding, h + d, context, drive)
        return (kappa * d + rho) / (1 - kappa) * FLOAT64_SLACK, rho >= kappa * d

    def residual_bound(self, residual: Tensor, h: Tensor, context: Tensor, drive: Tensor) -> Tensor:
        """(‖F(h) − h‖ + ρ₆₄)/(1 − κ) per sample (float64), `residual` the norm of F(h) − h computed in float64."""
        kappa = float(self.kappa)
        if kappa >= 1.0:
            return torch.full_like(residual, float("inf"))
        rho = _affine(self.float64_rounding, h, context, drive)
        return (residual * (1 + 2.0**-52) + rho) / (1 - kappa) * FLOAT64_SLACK


def _affine(c: tuple[float, ...], h: Tensor, context: Tensor, drive: Tensor) -> Tensor:
    return c[0] + c[1] * h + c[2] * context + c[3] * drive
