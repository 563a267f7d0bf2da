"""Does depth go where the error is? Per exit rule: loops used against the true error, and how well the loop's
confidence signals (certified bound, readout disagreement, the learned error head) flag the largest errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from loopwm.analysis.agreement import agreement_score, rms_distance
from loopwm.analysis.stats import as_numpy, auroc, spearman, top_fraction
from loopwm.exits import EXIT_RULES, LoopOptions
from loopwm.loop_state import LoopTrace
from loopwm.world_model import WorldModel

if TYPE_CHECKING:
    from loopwm.analysis.sections import Probe


def confidence_signals(wm: WorldModel, trace: LoopTrace) -> dict[str, Tensor]:
    """Per-sample "expect a large error" scores of one step: the certified bound at exit, readout disagreement
    (minus `agreement_score`, when the trace holds two or more readouts) and the error head's log prediction."""
    signals = {"bound": trace.bound}
    if trace.readouts is not None and len(trace.readouts) >= 2:
        signals["agreement"] = -agreement_score(trace.readouts)
    if wm.has_error_head:
        signals["head"] = wm.core.predicted_log_error(trace.final_state)
    return signals


def depth_stats(
    error: Tensor, loops: Tensor, signals: dict[str, Tensor], flag_fraction: float = 0.1
) -> dict[str, Optional[float]]:
    """Mean loops and error, Spearman(loops used, error) (None when every sample used the same loops) and each
    signal's AUROC at flagging the top `flag_fraction` errors (`auroc_<name>`; None for a constant signal)."""
    err, used = as_numpy(error), as_numpy(loops)
    flags = top_fraction(err, flag_fraction)
    out: dict[str, Optional[float]] = {
        "mean_loops": float(used.mean()),
        "error_mean": float(err.mean()),
        "spearman_loops_error": spearman(used, err) if np.ptp(used) > 0 else None,
    }
    for name, score in signals.items():
        s = as_numpy(score)
        out[f"auroc_{name}"] = auroc(s, flags) if np.isfinite(s).all() and np.ptp(s) > 0 else None
    return out


@torch.no_grad()
def exit_depth(
    wm: WorldModel, z: Tensor, action: Tensor, target: Tensor, options: LoopOptions, flag_fraction: float = 0.1
) -> dict[str, Optional[float]]:
    """`depth_stats` of one step from latents z under `options`, the error being the RMS latent distance of the
    prediction to `target` (the encoded next observation)."""
    z1, trace = wm.step(z, action, options=options, readouts=True)
    return depth_stats(rms_distance(z1, target), trace.loops_used, confidence_signals(wm, trace), flag_fraction)


def exit_rule_options(wm: WorldModel, loops: int) -> dict[str, LoopOptions]:
    """Every registered exit rule at the model's settings, "fixed" at `loops` (the count it trained around). The gate
    and relative rules read the learned gate and error head: untrained (w_gate, w_error = 0) they say little."""
    return {
        name: LoopOptions.from_config(wm.cfg, exit=name, **({"loops": loops} if name == "fixed" else {}))
        for name in usable_rules(wm)
    }


def usable_rules(wm: WorldModel) -> list[str]:
    """The exit rules `wm` can run: the relative exit needs an error head (`model.error_head`)."""
    return [name for name, rule in EXIT_RULES.items() if wm.has_error_head or not rule.needs_error_head]


def exits_section(p: "Probe") -> dict[str, Any]:
    """(10) For every exit rule: mean loops, error, Spearman(loops used, error) and the confidence signals' AUROC."""
    rules = exit_rule_options(p.wm, p.T0)
    return {
        name: exit_depth(p.wm, p.tr.z, p.tr.action, p.tr.target, opts, p.settings.flag_fraction)
        for name, opts in rules.items()
    }
