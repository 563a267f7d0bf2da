"""What one environment step of the loop carries: its fixed context, the rollout-wide parameters and the trace of
what each sample's loop did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from loopwm.certificate import LoopCertificate, norm_bounds


@dataclass
class StepContext:
    """Everything the loop map needs that is fixed across the loops of one environment step."""

    retention: Tensor  # Ā, [H]
    drive: Tensor  # B̄ e, [B, H]
    block_ctx: list[Tensor]  # the injection's share of each block layer
    weights: list[Tensor]  # effective h-path weights (output map × s), computed once per forward
    scale: Tensor  # s, the block's output gain
    kappa: Tensor  # certified Lipschitz constant of h ↦ F(h, e)
    certificate: LoopCertificate  # κ's parts and the rounding term of the certified bound
    stages: tuple["StepContext", ...] = ()  # an unshared stack's context of each loop (the fields above: loop 0's)
    input_norms: Optional[tuple[Tensor, Tensor]] = None  # (‖drive‖, Σ‖block_ctx‖) bounds: see `norms`

    def at(self, t: int) -> "StepContext":
        """The context of loop t: this one for a shared block, stage t's for an unshared stack."""
        return self.stages[t] if self.stages else self

    def norms(self) -> tuple[Tensor, Tensor]:
        """Norm bounds (float64, per sample) of the drive and of the summed injection terms: the same for every
        loop of the step, so computed once."""
        if self.input_norms is None:
            drive = norm_bounds(self.drive)
            context = sum((norm_bounds(c) for c in self.block_ctx), torch.zeros_like(drive))
            self.input_norms = (drive, context)
        return self.input_norms

    def select(self, index: Tensor) -> "StepContext":
        """The context of a subset of the batch (shared parts are kept as they are)."""
        return StepContext(
            self.retention,
            self.drive[index],
            [c[index] for c in self.block_ctx],
            self.weights,
            self.scale,
            self.kappa,
            self.certificate,
            tuple(s.select(index) for s in self.stages),
        )


@dataclass
class LoopParams:
    """The parameter-only part of a step's context: one computation serves a whole rollout (`weight_scope`)."""

    retention: Tensor  # Ā, [H]
    delta: Tensor  # the injection's step size softplus(δ), [H]
    weights: list[Tensor]  # effective h-path weights, the output map pre-multiplied by s
    scale: Tensor  # s
    kappa: Tensor  # κ (an unshared stack's: the largest of its stages')
    certificate: LoopCertificate
    stages: tuple["LoopParams", ...] = ()  # an unshared stack's parameters of each loop


@dataclass
class LoopTrace:
    """What the loop did for each sample: step norms, loops used, the certified distance at exit."""

    step_norms: Tensor  # [T, B] ‖h(t) − h(t−1)‖, zero after a sample has exited
    loops_used: Tensor  # [B] loops actually run per sample
    bound: Optional[Tensor]  # [B] certified distance to h* at exit (`LoopCore.certified_bound`); None uncertified
    converged: Optional[Tensor]  # [B] whether the bound met the exit tolerance; None uncertified
    kappa: float
    states: Optional[list[Tensor]] = None  # h(0..T) when asked for
    readouts: Optional[list[Tensor]] = None  # readout(h(t)) for t = 1..T when asked for
    gate: Optional[Tensor] = None  # [T, B] exit-gate probabilities
    final_state: Optional[Tensor] = None  # h at exit, [B, H]

    @property
    def mean_loops(self) -> float:
        return float(self.loops_used.float().mean())
