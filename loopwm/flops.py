"""Analytic multiply-add counts of a world model's forward passes, for compute-matched comparisons.

Counts are per sample and cover the linear maps (matmuls), which dominate on a CPU; norms,
activations and convolutions are not counted. A FLOP is two multiply-adds.
"""

from __future__ import annotations

from torch import nn

from loopwm.lipschitz import CertifiedLinear
from loopwm.world_model import WorldModel


def linear_macs(*modules: nn.Module) -> int:
    """Multiply-adds per input row of every linear map inside `modules`."""
    linears = (nn.Linear, CertifiedLinear)
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, linears))


def step_macs(wm: WorldModel, loops: float, heads: bool = True) -> dict[str, float]:
    """Multiply-adds of one imagined step (no observation) with `loops` loops from h = 0, by part.

    The first loop from zero skips the block's first h-path matmul where the block allows it
    (`Block.loop_macs(from_zero=True)`); a fractional `loops` (a mean over samples) counts the
    remaining loops pro rata. `heads` adds the reward and continue heads.
    """
    if loops < 1:
        raise ValueError(f"loops={loops}: expected at least one loop")
    block = wm.core.block
    parts = {
        "prelude": float(linear_macs(wm.action_embed, wm.prelude)),
        "injection": float(linear_macs(wm.core.inject) + block.context_macs()),
        "loops": float(block.loop_macs(from_zero=True) + (loops - 1) * block.loop_macs(from_zero=False)),
        "coda": float(linear_macs(wm.coda)),
        "heads": float(linear_macs(wm.reward_head, wm.continue_head)) if heads else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts
