"""A loop-free dynamics core in TD-MPC2's style (`model.dynamics=mlp`), to measure what the loop buys.

Between the shared prelude and coda it maps the injection once, h = W_out·x_L with
x_l = Mish(LayerNorm(W_l x_{l−1} + b_l)), x_0 = e: no state is carried from one loop to the next.
It presents the part of `LoopCore` that the model, the objective and the planner call (`prepare`,
`run`, `weight_scope`, `kappa`), so it trains and plans through the same code: one evaluation per
step whatever the exit rule, κ = 0 (the map does not read h) and a bound of 0 (nothing to converge).
The latent is normalised like every loopwm latent, by a LayerNorm without affine parameters on the
coda's output (TD-MPC2 uses SimNorm there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from loopwm.config import ModelConfig
from loopwm.exits import LoopOptions
from loopwm.loop_state import LoopTrace


@dataclass
class PlainContext:
    """A step's input to the plain core: the injection e."""

    e: Tensor

    def select(self, index: Tensor) -> "PlainContext":
        return PlainContext(self.e[index])


class PlainCore(nn.Module):
    """`model.dynamics_depth` Linear-LayerNorm-Mish layers of width `model.dynamics_width`, then a linear map to h."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        d, w = cfg.inject_dim, cfg.dynamics_width
        for _ in range(cfg.dynamics_depth):
            layers += [nn.Linear(d, w), nn.LayerNorm(w), nn.Mish()]
            d = w
        layers.append(nn.Linear(d, cfg.hidden_dim))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def cost(cfg: ModelConfig) -> dict[str, int]:
        """Parameters and multiply-adds per sample of the core `cfg` describes, without building it."""
        w, depth, n_in, n_out = cfg.dynamics_width, cfg.dynamics_depth, cfg.inject_dim, cfg.hidden_dim
        macs = n_in * w + (depth - 1) * w * w + w * n_out
        return {"parameters": macs + depth * 3 * w + n_out, "macs": macs}  # biases and LayerNorm's 2w per layer

    def prepare(self, e: Tensor) -> PlainContext:
        return PlainContext(e)

    @contextlib.contextmanager
    def weight_scope(self) -> Iterator[None]:
        """Nothing to share across a rollout's steps."""
        yield

    def kappa(self) -> Tensor:
        """0: the map's output does not depend on h."""
        return torch.zeros((), dtype=torch.float64)

    def run(
        self,
        ctx: PlainContext,
        h0: Optional[Tensor] = None,
        options: Optional[LoopOptions] = None,
        *,
        keep_states: bool = False,
        readout: Optional[Callable[[Tensor], Tensor]] = None,
        certify: bool = True,
    ) -> tuple[Tensor, LoopTrace]:
        """One evaluation h = MLP(e), reported as one loop from h0 (zeros by default) whatever `options` asks;
        its bound is exactly 0 (there is no fixed point to approach), so `certify` costs nothing and is ignored."""
        h = self.net(ctx.e)
        if h0 is not None and (not isinstance(h0, Tensor) or tuple(h0.shape) != tuple(h.shape)):
            shape = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
            raise ValueError(f"h0 has shape {shape}; expected {tuple(h.shape)} (batch, model.hidden_dim)")
        start = torch.zeros_like(h) if h0 is None else h0.to(h.dtype)
        batch = h.shape[0]
        trace = LoopTrace(
            step_norms=(h - start).norm(dim=-1)[None],
            loops_used=torch.ones(batch, dtype=torch.long, device=h.device),
            bound=torch.zeros(batch, dtype=h.dtype, device=h.device),
            converged=torch.ones(batch, dtype=torch.bool, device=h.device),
            kappa=0.0,
            states=[start, h] if keep_states else None,
            readouts=[readout(h)] if readout is not None else None,
            final_state=h,
        )
        return h, trace
