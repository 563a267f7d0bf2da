"""Certified spectral-norm bounds, in the dtype they run in, and the linear maps that use them.

Power iteration (as in `torch.nn.utils.spectral_norm`) only gives a *lower* estimate of ‖W‖₂, so
dividing by it certifies nothing. `spectral_norm_bound` gives a rigorous *upper* bound instead, one
that holds for the floating-point numbers actually computed, for every finite W (zero included):

1. Scale by a power of two, Wn = W·2^-e with max|Wn| ∈ [1/2, 1). This is exact, so nothing
   underflows or overflows later (forming WᵀW first squares 1e-23 to 0 and 1e19 to inf in float32).
2. Repeated Gram products X_{i+1} = X_iᵀX_i / c_i, X_0 = Wn, with c_i a power of two near
   ‖X_iᵀX_i‖_F (again exact). Then ‖X_i‖₂² = ‖X_iᵀX_i‖₂ ≤ c_i‖X_{i+1}‖₂ + ε_i, where ε_i bounds the
   rounding of the computed product: |fl(AB) − AB| ≤ γ_n|A||B| elementwise for inner dimension n,
   with γ_n = nu/(1 − nu) and u the unit roundoff, for any summation order, FMA or not (Higham,
   *Accuracy and Stability of Numerical Algorithms*, §3.5). So ‖fl(XᵀX) − XᵀX‖₂ ≤ γ_n‖|X|‖₂² ≤
   γ_n‖X‖_F², plus n·r·tiny for underflow (tiny = the dtype's smallest normal number).
3. The last X is bounded by ‖X‖₂ ≤ (‖X‖₁‖X‖_∞)^½ and the chain is unwound,
   β_i = (c_i β_{i+1} + ε_i)^½. With 5 products the Gershgorin step costs a factor r^(1/64) at most
   (r = min(rows, cols); 3% for random matrices, none for orthogonal ones), and ε_0 adds a relative
   γ_n‖Wn‖_F²/(2‖Wn‖₂²) ≤ γ_n·r/2 (float32, 1024×512: 0.5% random, 1.6% orthogonal).

Sums of squares and of |x| are taken in the working dtype and rounded up by their own γ; ε_i and the
unwinding are float64 scalars, whose few roundings (counted in `_bookkeeping_slack`) a final factor
1 + γ_M covers. A weight that is not finite has no bound and raises `NonFiniteWeightError`, naming
the parameter.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SQUARINGS = 4
"""Squarings after the Gram product: 5 matrix products in all, as many as in the plain Gram chain."""


class NonFiniteWeightError(ValueError):
    """A weight holds inf or NaN, so no spectral-norm bound (and no certificate) exists for it."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: the relative error bound of one correctly rounded operation in `dtype` (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = nu/(1 − nu): the relative error bound of an n-term inner product in `dtype`."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"inner dimension {n} is too large for a rounding bound in {dtype}")
    return nu / (1 - nu)


def _sum_bound(x: Tensor, dim: int) -> Tensor:
    """max over the other dim of Σ_dim |x| (float64), rounded up: the sums' rounding is ≤ γ_n relative."""
    return x.abs().sum(dim).amax().to(torch.float64) * (1 + gamma(x.shape[dim], x.dtype))


def _frobenius_sq_bound(x: Tensor) -> float:
    """An upper bound on ‖x‖_F² (row sums of squares, then their sum, in x's dtype); it only sizes slack and scales."""
    return float(x.detach().square().sum(1).sum()) * (1 + gamma(sum(x.shape) + 1, x.dtype)) * (1 + 2.0**-52)


def abs_norm_bound(weight: Tensor) -> Tensor:
    """An upper bound on ‖|W|‖₂ (float64): (max column sum · max row sum of |W|)^½, for rounding terms."""
    w = weight.detach().reshape(weight.shape[0], -1)
    return torch.sqrt(_sum_bound(w, 0) * _sum_bound(w, 1)) * (1 + 2.0**-51)


class ScaledBound(NamedTuple):
    """A weight split as W ≈ 2^e·Wn, with float64 upper bounds on ‖Wn‖₂ and ‖Wn‖_F."""

    scaled: Tensor  # Wn, in the weight's dtype; max|Wn| ∈ [1/2, 1), or all zeros
    scale: Tensor  # 2^e, float64
    norm: Tensor  # ≥ ‖Wn‖₂, float64, differentiable in W
    frobenius: Tensor  # ≥ ‖Wn‖_F, float64


def _bookkeeping_slack(products: int) -> float:
    """1 + γ_M for the float64 scalar operations of one bound: at most 8 per level and 16 at the ends."""
    return 1 + gamma(8 * products + 16, torch.float64)


def _scale_exactly(w: Tensor, exponent: int) -> Tensor:
    """w·2^-exponent by at most two multiplications by representable powers of two.

    For exponent ≤ 0 both factors are ≥ 1, so the products are exact; for exponent > 0 the one factor
    is representable (as a subnormal at worst) and only results below the normal range round.
    """
    if exponent > 0:
        return w * 2.0**-exponent
    first = (-exponent) // 2
    return w * 2.0**first * 2.0 ** (-exponent - first)


def scaled_bound(
    weight: Tensor, squarings: int = SQUARINGS, *, name: str = "weight", dtype: Optional[torch.dtype] = None
) -> ScaledBound:
    """Scale W by a power of two and bound the result's spectral norm rigorously (see the module doc).

    The Gram chain runs in `dtype` (the weight's by default); the bound covers its rounding either way.
    """
    w = weight.reshape(weight.shape[0], -1)
    peak = float(w.detach().abs().amax())
    if not math.isfinite(peak):
        raise NonFiniteWeightError(
            f"{name} has non-finite entries (inf or NaN): no spectral-norm bound exists, so the loop "
            f"cannot be certified; the weights diverged or were loaded from a corrupt source"
        )
    exponent = math.frexp(peak)[1]  # peak = f·2^exponent, f ∈ [1/2, 1); 0 for a zero matrix
    scale = torch.ldexp(torch.ones((), dtype=torch.float64, device=w.device), torch.tensor(exponent, device=w.device))
    wn = _scale_exactly(w, exponent)
    if peak == 0.0:  # ‖0‖₂ = 0 exactly; the chain below would only add underflow slack
        zero = 0.0 * wn.sum().to(torch.float64)
        return ScaledBound(wn, scale, zero, zero.detach())
    compute = dtype or w.dtype
    tiny = torch.finfo(compute).tiny
    x = wn.to(compute)
    if x.shape[0] < x.shape[1]:
        x = x.T
    inner, r = x.shape
    frob_sq = _frobenius_sq_bound(x)
    levels, sq = [], frob_sq
    for _ in range(squarings + 1):
        p = x.T @ x
        p_sq = _frobenius_sq_bound(p)
        c = 2.0 ** math.frexp(math.sqrt(p_sq))[1]
        # Rounding of the product, underflow in it, and underflow when dividing by c.
        err = gamma(inner, compute) * sq + r * inner * tiny + c * r * tiny
        x = p / c
        levels.append((c, err))
        inner, sq = r, p_sq / (c * c)
    beta = torch.sqrt(_sum_bound(x, 0) * _sum_bound(x, 1))
    for c, err in reversed(levels):
        beta = torch.sqrt((c * beta + err).clamp_min(torch.finfo(torch.float64).tiny))
    # ‖Wn − W·2^-e‖₂ ≤ √(ab)·tiny covers entries that rounded below the normal range when scaled.
    beta = (beta + w.numel() ** 0.5 * torch.finfo(w.dtype).tiny) * _bookkeeping_slack(squarings + 1)
    return ScaledBound(
        wn, scale, beta, torch.tensor(math.sqrt(frob_sq) * (1 + 2.0**-52), dtype=torch.float64, device=w.device)
    )


def round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Nonnegative float64 x cast to `dtype` so that no entry falls below x (zeros stay zero); keeps the gradient.

    Round-to-nearest loses at most u relative (or tiny/2 below the normal range), so inflating x by
    2u and adding the dtype's tiny to every positive entry first is enough.
    """
    if dtype == torch.float64:
        return x
    return (x * (1 + 2 * unit_roundoff(dtype)) + torch.finfo(dtype).tiny * (x > 0)).to(dtype)


def spectral_norm_bound(
    weight: Tensor, squarings: int = SQUARINGS, *, name: str = "weight", dtype: Optional[torch.dtype] = None
) -> Tensor:
    """A differentiable upper bound on ‖W‖₂ in W's dtype, valid for every finite W (inf if it overflows)."""
    b = scaled_bound(weight, squarings, name=name, dtype=dtype)
    return round_up(b.scale * b.norm, weight.dtype)


def exact_spectral_norm(weight: Tensor) -> float:
    """The exact ‖W‖₂ by SVD; for audits and tests, not the hot path."""
    return float(torch.linalg.matrix_norm(weight.detach().reshape(weight.shape[0], -1).double(), ord=2))


class Certified(NamedTuple):
    """A weight as the forward pass applies it, with what the certificate and its rounding term need."""

    weight: Tensor  # the applied weight
    lip: Tensor  # float64 upper bound on ‖weight‖₂ (≤ 1 when constrained)
    abs_norm: Tensor  # float64 upper bound on ‖|weight|‖₂, for rounding terms


class CertifiedLinear(nn.Module):
    """A linear map whose applied weight Wn/d has spectral norm ≤ 1 (or the raw W when unconstrained).

    With W = 2^e·Wn, d ≥ ‖Wn‖₂ + u‖Wn‖_F rounded up, the division's rounding (each entry off by a
    relative u at most) cannot lift the applied weight's norm above 1; `certify` reports the bound.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, constrained: bool = True):
        super().__init__()
        self.constrained = constrained
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)

    def certify(self, name: str = "weight") -> Certified:
        """The applied weight, an upper bound on its spectral norm and on its absolute value's norm."""
        w = self.weight
        if not self.constrained:
            with torch.no_grad():
                b = scaled_bound(w, name=name)
            return Certified(w, (b.scale * b.norm).detach(), abs_norm_bound(w))
        b = scaled_bound(w, name=name)
        u = unit_roundoff(w.dtype)
        # ‖fl(Wn/d)‖₂ ≤ (‖Wn‖₂ + u‖Wn‖_F + √(ab)·tiny)/d; the factor covers the two float64 additions
        # here and the division in `lip`.
        numerator = (b.norm + u * b.frobenius + w.numel() ** 0.5 * torch.finfo(w.dtype).tiny) * (1 + 4 * 2.0**-53)
        divisor = round_up(numerator.clamp_min(0.5), w.dtype)  # ‖Wn‖₂ ≥ max|Wn| ≥ 1/2 unless Wn = 0
        applied = b.scaled / divisor
        lip = (numerator / divisor.to(torch.float64)).detach()
        return Certified(applied, lip, abs_norm_bound(applied))

    def effective_weight(self) -> Tensor:
        """The weight actually applied; call once per forward pass and reuse across loops."""
        return self.certify().weight

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        """x ↦ x W_effᵀ + b with a precomputed effective weight."""
        return F.linear(x, weight, self.bias)


ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "leaky_relu": F.leaky_relu}
"""Activations that are 1-Lipschitz, so they never raise the certificate."""
