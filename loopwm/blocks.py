"""Shared blocks R̄(h, e) for the loop, each with a certified Lipschitz bound in h, and their registry.

A block splits into `context(e)` (everything that depends on the injection only, computed once
per environment step) and `forward(h, ctx, weights, base)` = base + R(h) (the h-path, run once per
loop, fused into addmm calls). Every map on the h-path is a `CertifiedLinear` or a 1-Lipschitz
activation, so Lip_h(block) ≤ Π‖W_i‖₂; the loop passes the output map pre-multiplied by its gain s.

A new block is one class that follows `Block` plus one `@register_block("name")` line; it builds
itself from the model config, and its own settings live in `model.block_options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from loopwm.config import ConfigError, ModelConfig
from loopwm.lipschitz import ACTIVATIONS, CertifiedLinear
from loopwm.sections import Section, build_dataclass


@runtime_checkable
class Block(Protocol):
    """What the loop needs of a shared block (an `nn.Module`).

    - `Options`: a `config.Section` dataclass of the block's own settings (`model.block_options`);
    - `check(cfg, options)`: refuse model shapes the block cannot take (runs when the config is built);
    - `from_config(cfg, options)`: build from the model config;
    - `linears()`: every map on the h-path, in order; Lip_h(block) ≤ the product of their bounds;
    - `context(e)`: tensors that depend on the injection e only, computed once per environment step;
    - `forward(h, ctx, weights, base)`: base + R(h, e) with `weights` the effective h-path weights
      (the last pre-multiplied by the gain s); h=None stands for h = 0;
    - `layer_outputs(h, ctx, weights)`: each layer's output, for per-layer fixed-point analyses;
    - `context_macs()`, `loop_macs(from_zero)`: multiply-adds per sample of `context` and of one loop
      (`from_zero`: the first loop from h = 0), for analytic FLOP counts.
    """

    Options: ClassVar[type]

    @staticmethod
    def check(cfg: ModelConfig, options: Section) -> None: ...

    @classmethod
    def from_config(cls, cfg: ModelConfig, options: Section) -> "Block": ...

    def linears(self) -> list[CertifiedLinear]: ...

    def context(self, e: Tensor) -> list[Tensor]: ...

    def forward(self, h: Optional[Tensor], ctx: list[Tensor], weights: list[Tensor], base: Tensor) -> Tensor: ...

    def layer_outputs(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]) -> list[Tensor]: ...

    def context_macs(self) -> int: ...

    def loop_macs(self, from_zero: bool) -> int: ...


BLOCKS: dict[str, type] = {}
"""Registered shared blocks by `model.block` name."""


def register_block(name: str) -> Callable[[type], type]:
    """Class decorator: make a block buildable as `model.block: name`."""

    def add(cls: type) -> type:
        if name in BLOCKS and BLOCKS[name] is not cls:
            raise ValueError(f"a block named {name!r} is already registered ({BLOCKS[name].__name__})")
        BLOCKS[name] = cls
        return cls

    return add


def block_options(cfg: ModelConfig) -> Section:
    """The named block's options, built from `model.block_options` (unknown keys are refused)."""
    if cfg.block not in BLOCKS:
        raise ConfigError(f"model.block={cfg.block!r}: expected one of {sorted(BLOCKS)}")
    return build_dataclass(BLOCKS[cfg.block].Options, cfg.block_options, "model.block_options")


def check_block(cfg: ModelConfig) -> None:
    """Refuse an unknown block or options that the block cannot take (called by `ModelConfig`)."""
    options = block_options(cfg)
    BLOCKS[cfg.block].check(cfg, options)


def make_block(cfg: ModelConfig) -> nn.Module:
    """Build the shared block named by `model.block`."""
    return BLOCKS[cfg.block].from_config(cfg, block_options(cfg))


@dataclass
class NoOptions(Section):
    """A block without settings of its own."""

    prefix: ClassVar[str] = "model.block_options"


@register_block("mlp")
class MLPBlock(nn.Module):
    """x₀ = h, x_{l+1} = φ(W_l x_l + U_l e + b_l), out = W_out x_L: a residual-free MLP on the h-path."""

    Options = NoOptions

    @classmethod
    def from_config(cls, cfg: ModelConfig, options: NoOptions) -> "MLPBlock":
        return cls(
            cfg.hidden_dim, cfg.inject_dim, cfg.block_depth, 2 * cfg.hidden_dim, cfg.activation, cfg.constrain_block
        )

    @staticmethod
    def check(cfg: ModelConfig, options: NoOptions) -> None:
        """Every model shape works."""

    def __init__(self, hidden: int, inject: int, depth: int, width: int, activation: str, constrained: bool):
        super().__init__()
        dims = [hidden] + [width] * depth
        self.h_path = nn.ModuleList(
            CertifiedLinear(a, b, bias=False, constrained=constrained) for a, b in zip(dims[:-1], dims[1:])
        )
        self.e_path = nn.ModuleList(nn.Linear(inject, width) for _ in range(depth))
        self.out = CertifiedLinear(width, hidden, bias=False, constrained=constrained)
        self.act = ACTIVATIONS[activation]

    def linears(self) -> list[CertifiedLinear]:
        """The maps on the h-path, in order."""
        return [*self.h_path, self.out]

    def context(self, e: Tensor) -> list[Tensor]:
        """The injection's contribution to each layer, fixed across the loops of one step."""
        return [lin(e) for lin in self.e_path]

    def context_macs(self) -> int:
        return sum(lin.weight.numel() for lin in self.e_path)

    def loop_macs(self, from_zero: bool) -> int:
        """The first loop from h = 0 skips the first h-path matmul (`forward` with h=None)."""
        return sum(lin.weight.numel() for lin in self.linears()[int(from_zero) :])

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


@dataclass
class TokenOptions(Section):
    """`model.block_options` of the token block."""

    prefix: ClassVar[str] = "model.block_options"
    tokens: int = field(default=4, metadata={"range": (1, 64, False, False)})


@register_block("token")
class TokenBlock(nn.Module):
    """N latent tokens: a spectral-normed token-mixing map across tokens, then a per-token channel MLP.

    Mixing H ↦ M H acts on every channel column with the same N×N matrix, so its Lipschitz constant
    in the Frobenius norm is ‖M‖₂. The injection enters through per-token biases only, which keeps
    the bound global (unlike dot-product attention on h, which is not Lipschitz).
    """

    Options = TokenOptions

    @classmethod
    def from_config(cls, cfg: ModelConfig, options: TokenOptions) -> "TokenBlock":
        return cls(cfg.hidden_dim, cfg.inject_dim, cfg.block_depth, options.tokens, cfg.activation, cfg.constrain_block)

    @staticmethod
    def check(cfg: ModelConfig, options: TokenOptions) -> None:
        """The hidden state must split evenly into tokens."""
        if cfg.hidden_dim % options.tokens:
            raise ConfigError(
                f"model.hidden_dim={cfg.hidden_dim} must be divisible by model.block_options.tokens={options.tokens}"
            )

    def __init__(self, hidden: int, inject: int, depth: int, tokens: int, activation: str, constrained: bool):
        super().__init__()
        self.tokens, self.dim = tokens, hidden // tokens
        width = 2 * self.dim
        self.mix = nn.ModuleList(
            CertifiedLinear(tokens, tokens, bias=False, constrained=constrained) for _ in range(depth)
        )
        self.up = nn.ModuleList(
            CertifiedLinear(self.dim, width, bias=False, constrained=constrained) for _ in range(depth)
        )
        self.down = nn.ModuleList(
            CertifiedLinear(width, self.dim, bias=False, constrained=constrained) for _ in range(depth)
        )
        self.e_path = nn.ModuleList(nn.Linear(inject, tokens * width) for _ in range(depth))
        self.act = ACTIVATIONS[activation]
        self.width = width

    def linears(self) -> list[CertifiedLinear]:
        """The maps on the h-path, in order (mix, up, down per layer)."""
        return [lin for trio in zip(self.mix, self.up, self.down) for lin in trio]

    def context(self, e: Tensor) -> list[Tensor]:
        return [lin(e).view(e.shape[0], self.tokens, self.width) for lin in self.e_path]

    def context_macs(self) -> int:
        return sum(lin.weight.numel() for lin in self.e_path)

    def loop_macs(self, from_zero: bool) -> int:
        """Mixing costs N² per channel; each token's channel maps cost their weight size (h = 0 is not skipped)."""
        per_layer = self.tokens * self.tokens * self.dim + 2 * self.tokens * self.dim * self.width
        return per_layer * len(self.mix)

    def _layers(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]):
        x = h.view(h.shape[0], self.tokens, self.dim)
        for i, u in enumerate(ctx):
            w_mix, w_up, w_down = weights[3 * i : 3 * i + 3]
            x = torch.einsum("nm,bmd->bnd", w_mix, x)
            x = self.down[i].forward_with(self.act(self.up[i].forward_with(x, w_up) + u), w_down)
            yield x

    def forward(self, h: Optional[Tensor], ctx: list[Tensor], weights: list[Tensor], base: Tensor) -> Tensor:
        """base + R(h); h=None stands for h = 0."""
        h = torch.zeros_like(base) if h is None else h
        return base + self.layer_outputs(h, ctx, weights)[-1]

    def layer_outputs(self, h: Tensor, ctx: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
        return [x.reshape(h.shape[0], -1) for x in self._layers(h, ctx, weights)]
