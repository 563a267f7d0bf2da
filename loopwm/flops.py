"""Analytic multiply-add counts of a world model's forward passes, for compute-matched comparisons.

Counts are per sample and cover the linear maps (matmuls), which dominate on a CPU; norms,
activations and convolutions are not counted. A FLOP is two multiply-adds.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from torch import nn

from loopwm.config import ModelConfig
from loopwm.lipschitz import CertifiedLinear
from loopwm.nets import SpaceSpec
from loopwm.plain import PlainCore
from loopwm.world_model import WorldModel

Cost = Literal["parameters", "macs"]


def linear_macs(*modules: nn.Module) -> int:
    """Multiply-adds per input row of every linear map inside `modules`."""
    linears = (nn.Linear, CertifiedLinear)
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, linears))


def step_macs(wm: WorldModel, loops: Optional[float] = None, heads: bool = True) -> dict[str, float]:
    """Multiply-adds of one imagined step (no observation) with `loops` loops from h = 0, by part.

    `loops` defaults to the model's `model.loops`. The first loop from zero skips the block's first
    h-path matmul where the block allows it (`Block.loop_macs(from_zero=True)`); a fractional `loops`
    (a mean over samples) counts the remaining loops pro rata. An unshared stack computes every
    block's injection terms once per step and runs at most one loop per block. A plain MLP core
    (`model.dynamics=mlp`) evaluates once: its part is "dynamics" instead of "injection" and "loops".
    `heads` adds the reward and continue heads.
    """
    cfg = wm.cfg
    parts = {"prelude": float(linear_macs(wm.action_embed, wm.prelude))}
    if isinstance(wm.core, PlainCore):
        if loops not in (None, 1):
            raise ValueError(f"loops={loops}: a plain MLP core (model.dynamics='mlp') evaluates once per step")
        parts["dynamics"] = float(linear_macs(wm.core))
    else:
        loops = cfg.loops if loops is None else loops
        if loops < 1:
            raise ValueError(f"loops={loops}: expected at least one loop")
        blocks = wm.core.blocks()
        if not cfg.shared and loops > len(blocks):
            raise ValueError(f"loops={loops}: the unshared stack has {len(blocks)} blocks, one per loop")
        parts["injection"] = float(linear_macs(wm.core.inject) + sum(b.context_macs() for b in blocks))
        first, later = blocks[0].loop_macs(from_zero=True), blocks[-1].loop_macs(from_zero=False)
        parts["loops"] = float(first + (loops - 1) * later)  # every block of a stack has the same shape
    parts["coda"] = float(linear_macs(wm.coda))
    parts["heads"] = float(linear_macs(wm.reward_head, wm.continue_head)) if heads else 0.0
    parts["total"] = sum(parts.values())
    return parts


def model_cost(wm: WorldModel, by: Cost) -> float:
    """A model's parameter count, or its multiply-adds per imagined step at its own `model.loops`."""
    if by == "parameters":
        return float(sum(p.numel() for p in wm.parameters()))
    if by == "macs":
        return step_macs(wm)["total"]
    raise ValueError(f"by={by!r}: expected 'parameters' or 'macs'")


def matched_width(cfg: ModelConfig, spec: SpaceSpec, target: float, by: Cost) -> int:
    """The `model.dynamics_width` at which the plain-MLP model of `cfg` (its depth, spaces and heads) costs
    closest to `target`, in parameters or in multiply-adds per step (e.g. a loopwm model's `model_cost`)."""
    base_cfg = dataclasses.replace(cfg, dynamics="mlp", shared=True, dynamics_width=1)
    base = model_cost(WorldModel(base_cfg, spec), by) - PlainCore.cost(base_cfg)[by]

    def cost(width: int) -> float:
        return base + PlainCore.cost(dataclasses.replace(base_cfg, dynamics_width=width))[by]

    if cost(1) > target:
        raise ValueError(f"no width matches {by}={target:g}: the plain MLP model costs {cost(1):g} at width 1")
    lo, hi = 1, 2  # cost(lo) <= target; grow hi until cost(hi) >= target, then bisect
    while cost(hi) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda w: abs(cost(w) - target))
