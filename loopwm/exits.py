"""How a step loops: `LoopOptions` (the exit rule and its limits, checked when built) and the exit rules.

Each rule is a small object in `EXIT_RULES`, the one list the config, the CLI and `LoopOptions` check names
against: "fixed" runs a set number of loops, "certified" stops once the certified distance to the fixed point
is within tolerance, "gate" once the learned exit probability passes its threshold, "relative" once that
distance is a small fraction of the error the model predicts for the sample (its error head), "agreement" once
two successive readouts (the predicted latent) agree within tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from loopwm.config import ConfigError, ModelConfig, PlannerConfig

if TYPE_CHECKING:
    from loopwm.loop import LoopCore


@dataclass(frozen=True)
class LoopOptions:
    """How one environment step loops: the exit rule and its limits, checked when built.

    `exit` names a rule in `EXIT_RULES`. "fixed" runs `loops` iterations (an int, or a per-sample
    long tensor); "certified" stops a sample once its certified distance to the fixed point is
    ≤ `tol`; "gate" once the learned exit probability exceeds `gate_threshold`; "relative" once it is
    ≤ `rel_tol` × the sample's predicted error (`RelativeExit`). The adaptive rules
    respect `min_loops`/`max_loops`. `bptt=k` backpropagates through the last k loops only, which
    needs the loop count in advance, so only "fixed" takes it; an option a rule cannot honour is
    refused here rather than ignored.
    """

    exit: str = "fixed"
    loops: Union[int, Tensor, None] = None
    min_loops: int = 1
    max_loops: int = 16
    tol: float = 1e-2
    gate_threshold: float = 0.5
    rel_tol: float = 0.1
    bptt: Optional[int] = None

    def __post_init__(self) -> None:
        rule = check_exit(self.exit)
        for name in ("min_loops", "max_loops"):
            _check_count(name, getattr(self, name))
        if self.min_loops > self.max_loops:
            raise ValueError(f"min_loops={self.min_loops} must be <= max_loops={self.max_loops}")
        for name in ("tol", "rel_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r}: expected a finite number > 0")
        if not isinstance(self.gate_threshold, (int, float)) or not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold={self.gate_threshold!r}: expected a number in [0, 1]")
        if self.bptt is not None:
            _check_count("bptt", self.bptt)
        if isinstance(self.loops, Tensor):
            if self.loops.is_floating_point() or self.loops.dim() != 1 or bool((self.loops < 1).any()):
                raise ValueError("loops as a tensor must be a 1-D integer tensor of counts >= 1")
        elif self.loops is not None:
            _check_count("loops", self.loops)
        rule.check(self)

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides: object) -> "LoopOptions":
        """The model config's exit rule and limits, with keyword overrides (e.g. `exit="certified"`)."""
        base = {
            "exit": cfg.exit,
            "min_loops": cfg.min_loops,
            "max_loops": cfg.max_loops,
            "tol": cfg.exit_tol,
            "gate_threshold": cfg.gate_threshold,
            "rel_tol": cfg.exit_rel_tol,
        }
        exit = overrides.get("exit", base["exit"])
        if exit == "fixed":
            base["loops"] = cfg.loops
        return cls(**{**base, **overrides})


def planner_loop_options(model: ModelConfig, planner: PlannerConfig) -> Optional[LoopOptions]:
    """The options a planner's imagined steps loop with: the model's, overridden by `planner.*` where set;
    None when the planner sets none (the model's defaults apply). Refuses a combination that cannot run."""
    overrides = planner.loop_overrides()
    if not overrides:
        return None
    try:
        return LoopOptions.from_config(model, **overrides)
    except ValueError as exc:
        keys = ", ".join(f"planner.{k}" for k in planner.LOOP_OPTIONS if getattr(planner, k) is not None)
        raise ConfigError(f"planner loop options ({keys} over model.*): {exc}") from None


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")


@dataclass
class LoopStep:
    """What an exit rule may read after one loop: the state, its step norm ‖h(t) − h(t−1)‖, the certified bound
    (current only for rules with `uses_bound`), the readouts so far (for rules with `needs_readout`), and a
    list the gate appends its probabilities to."""

    h: Tensor
    step_norm: Tensor
    bound: Tensor
    readouts: Optional[list[Tensor]]
    gates: list[Tensor]


class ExitRule:
    """An adaptive exit: `fire` says, after each loop, which samples may stop (`min_loops`/`max_loops` apply)."""

    name = ""
    uses_bound = False  # whether `fire` reads the certified bound after every loop
    needs_error_head = False  # whether `fire` reads the error head (model.error_head)
    needs_readout = False  # whether `fire` reads the latent read out after every loop

    def check(self, opts: LoopOptions) -> None:
        """Refuse the options only a fixed loop count can honour."""
        for name in ("loops", "bptt"):
            if getattr(opts, name) is not None:
                raise ValueError(
                    f"{name}={getattr(opts, name)!r} needs exit='fixed': the {self.name!r} exit decides the "
                    "loop count as it runs (use min_loops/max_loops to bound it)"
                )

    def targets(self, opts: LoopOptions, default: int, batch: int, device: torch.device) -> Optional[Tensor]:
        """Per-sample loop counts decided in advance, or None for a rule that decides as it runs."""
        return None

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> Optional[Tensor]:
        raise NotImplementedError


class FixedExit(ExitRule):
    """Run a set number of loops per sample (`loops`, default the model's `loops`)."""

    name = "fixed"

    def check(self, opts: LoopOptions) -> None:
        """Every option applies."""

    def targets(self, opts: LoopOptions, default: int, batch: int, device: torch.device) -> Tensor:
        loops = default if opts.loops is None else opts.loops
        return torch.as_tensor(loops, device=device).long().expand(batch)

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> None:
        return None


class CertifiedExit(ExitRule):
    """Stop once the certified distance κ/(1−κ)·‖h(t) − h(t−1)‖ (plus rounding) is ≤ `tol`."""

    name = "certified"
    uses_bound = True

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> Tensor:
        return step.bound <= opts.tol


class GateExit(ExitRule):
    """Stop once the learned exit gate's probability exceeds `gate_threshold` (Ouro-style)."""

    name = "gate"

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> Tensor:
        prob = core.exit_probability(step.h, step.step_norm.detach())
        step.gates.append(prob)
        return prob.detach() > opts.gate_threshold


class RelativeExit(ExitRule):
    """Stop once the certified distance to the fixed point is ≤ `rel_tol` × the error the model predicts for
    this sample (`LoopCore.predicted_distance`, the error head trained with `train.w_error`).

    The certified exit's tolerance is absolute: every sample loops until ‖h − h*‖ ≤ tol, however large its
    prediction error. Loops then go to the samples whose loop converges slowly (a large ‖h*‖, a stiff
    injection), and those need not be the ones the model predicts badly: on a sample whose error is large,
    loops past the first few shrink a loop error that the model error swamps. This rule scales each sample's
    tolerance by its own predicted error, so a sample stops once more loops could change its prediction by
    only a fraction of its expected error: the loops it saves are those on samples predicted to be badly
    off, and a sample predicted to be accurate loops on until the loop no longer limits it. At equal
    convergence it gives *fewer* loops to a larger predicted error; it puts the loop count where the loop's
    error matters, not where the model's error is large.
    """

    name = "relative"
    uses_bound = True
    needs_error_head = True

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> Tensor:
        return step.bound <= opts.rel_tol * core.predicted_distance(step.h.detach()).to(step.bound.dtype)


class AgreementExit(ExitRule):
    """Stop once the prediction stops moving: the RMS change, over latent dimensions, of the latent read out
    after this loop against the one after the previous loop is ≤ `tol`.

    The certified exit measures the loop state's distance to its fixed point, which is not the prediction's
    error: on a trained model the two can even be anti-correlated (docs/analysis.md). This rule watches the
    quantity the model outputs instead, PABEE-style, and spends further loops only while the readout still
    changes; readout disagreement is the confidence signal that flags large errors. Each loop then also
    pays for one readout (the coda). `tol` is in latent units: with LayerNorm latents (RMS about 1) it reads
    as a relative change.
    """

    name = "agreement"
    needs_readout = True

    def fire(self, core: "LoopCore", step: LoopStep, opts: LoopOptions) -> Tensor:
        r = step.readouts
        if r is None or len(r) < 2:  # `LoopCore.run` refuses this rule without a readout
            return torch.zeros(step.h.shape[0], dtype=torch.bool, device=step.h.device)
        return (r[-1] - r[-2]).detach().pow(2).flatten(1).mean(-1).sqrt() <= opts.tol


EXIT_RULES: dict[str, ExitRule] = {
    rule.name: rule for rule in (FixedExit(), CertifiedExit(), GateExit(), RelativeExit(), AgreementExit())
}
"""The exit rules by name: the one list the config, the CLI and `LoopOptions` check against."""


def check_exit(name: str) -> ExitRule:
    """The exit rule called `name`, or a ConfigError listing the known ones."""
    if name not in EXIT_RULES:
        raise ConfigError(f"exit={name!r}: expected one of {sorted(EXIT_RULES)}")
    return EXIT_RULES[name]
