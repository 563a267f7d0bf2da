"""Shared blocks R̄(h, e) for the loop, each with a certified Lipschitz bound in h.

A block splits into `context(e)` (everything that depends on the injection only, computed once
per environment step) and `forward(h, ctx, weights, base)` = base + R(h) (the h-path, run once per
loop, fused into addmm calls). Every map on the h-path is a `CertifiedLinear` or a 1-Lipschitz
activation, so Lip_h(block) ≤ Π‖W_i‖₂; the loop passes the output map pre-multiplied by its gain s.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from loopwm.lipschitz import ACTIVATIONS, CertifiedLinear


class MLPBlock(nn.Module):
    """x₀ = h, x_{l+1} = φ(W_l x_l + U_l e + b_l), out = W_out x_L: a residual-free MLP on the h-path."""

    def __init__(self, hidden: int, inject: int, depth: int, width: int, activation: str, constrained: bool):
        super().__init__()
        dims = [hidden] + [width] * depth
        self.h_path = nn.ModuleList(CertifiedLinear(a, b, bias=False, constrained=constrained)
                                    for a, b in zip(dims[:-1], dims[1:]))
        self.e_path = nn.ModuleList(nn.Linear(inject, width) for _ in range(depth))
        self.out = CertifiedLinear(width, hidden, bias=False, constrained=constrained)
        self.act = ACTIVATIONS[activation]

    def linears(self) -> list[CertifiedLinear]:
        """The maps on the h-path, in order."""
        return [*self.h_path, self.out]

    def context(self, e: Tensor) -> list[Tensor]:
        """The injection's contribution to each layer, fixed across the loops of one step."""
        return [lin(e) for lin in self.e_path]

    def forward(self, h: Optional[Tensor], ctx: list[Tensor], weights: list[Tensor], base: Tensor) -> Tensor:
        """base + R(h); h=None stands for h = 0, where the first layer is φ(U e + b) and its matmul is skipped."""
        x = self.act(ctx[0] if h is None else torch.addmm(ctx[0], h, weights[0].t()))
        for w, u in zip(weights[1:-1], ctx[1:]):
            x = self.act(torch.addmm(u, x, w.t()))
        return torch.addmm(base, x, weights[-1].t())

    def layer_outputs(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
        """Each layer's activation, for per-layer fixed-point analyses."""
        outs, x = [], h
        for lin, w, u in zip(self.h_path, weights, ctx):
            x = self.act(lin.forward_with(x, w) + u)
            outs.append(x)
        return outs


class TokenBlock(nn.Module):
    """N latent tokens: a spectral-normed token-mixing map across tokens, then a per-token channel MLP.

    Mixing H ↦ M H acts on every channel column with the same N×N matrix, so its Lipschitz constant
    in the Frobenius norm is ‖M‖₂. The injection enters through per-token biases only, which keeps
    the bound global (unlike dot-product attention on h, which is not Lipschitz).
    """

    def __init__(self, hidden: int, inject: int, depth: int, tokens: int, activation: str, constrained: bool):
        super().__init__()
        self.tokens, self.dim = tokens, hidden // tokens
        width = 2 * self.dim
        self.mix = nn.ModuleList(CertifiedLinear(tokens, tokens, bias=False, constrained=constrained)
                                 for _ in range(depth))
        self.up = nn.ModuleList(CertifiedLinear(self.dim, width, bias=False, constrained=constrained)
                                for _ in range(depth))
        self.down = nn.ModuleList(CertifiedLinear(width, self.dim, bias=False, constrained=constrained)
                                  for _ in range(depth))
        self.e_path = nn.ModuleList(nn.Linear(inject, tokens * width) for _ in range(depth))
        self.act = ACTIVATIONS[activation]
        self.width = width

    def linears(self) -> list[CertifiedLinear]:
        """The maps on the h-path, in order (mix, up, down per layer)."""
        return [lin for trio in zip(self.mix, self.up, self.down) for lin in trio]

    def context(self, e: Tensor) -> list[Tensor]:
        return [lin(e).view(e.shape[0], self.tokens, self.width) for lin in self.e_path]

    def _layers(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]):
        x = h.view(h.shape[0], self.tokens, self.dim)
        for i, u in enumerate(ctx):
            w_mix, w_up, w_down = weights[3 * i: 3 * i + 3]
            x = torch.einsum("nm,bmd->bnd", w_mix, x)
            x = self.down[i].forward_with(self.act(self.up[i].forward_with(x, w_up) + u), w_down)
            yield x

    def forward(self, h: Optional[Tensor], ctx: list[Tensor], weights: list[Tensor], base: Tensor) -> Tensor:
        """base + R(h); h=None stands for h = 0."""
        h = torch.zeros_like(base) if h is None else h
        return base + self.layer_outputs(h, ctx, weights)[-1]

    def layer_outputs(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
        return [x.reshape(h.shape[0], -1) for x in self._layers(h, ctx, weights)]


def make_block(kind: str, hidden: int, inject: int, depth: int, tokens: int, activation: str,
               constrained: bool) -> nn.Module:
    """Build the shared block named by `model.block`."""
    if kind == "mlp":
        return MLPBlock(hidden, inject, depth, 2 * hidden, activation, constrained)
    if kind == "token":
        return TokenBlock(hidden, inject, depth, tokens, activation, constrained)
    raise ValueError(f"model.block={kind!r}: expected 'mlp' or 'token'")
