"""Open-loop prediction error on held-out sequences, next to the predict-mean and no-change baselines.

Errors are mean squared errors divided, per observation dimension, by the data's variance and then
averaged over dimensions: 1.0 is what always predicting the mean scores. Frames are divided by the
variance over all pixels instead, since background pixels never vary.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from loopwm.analysis.depth import confidence_signals, depth_stats
from loopwm.exits import LoopOptions
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel


def _norm_sq_error(pred: torch.Tensor, true: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error divided by per-dimension variance, averaged over dimensions."""
    return ((pred - true).pow(2) / var).flatten(2).mean(-1)


@torch.no_grad()
def prediction_errors(
    wm: WorldModel,
    data: ReplayBuffer,
    horizons: Sequence[int] = (1, 10, 50),
    sequences: int = 256,
    seed: int = 0,
    obs_var: Optional[torch.Tensor] = None,
    obs_mean: Optional[torch.Tensor] = None,
    options: Optional[LoopOptions] = None,
    chain: bool = False,
) -> dict[str, Any]:
    """1/10/50-step open-loop errors of the model and both baselines, plus reward, continue and loop stats.

    Rolls out from z₀ = E(o₀) with the logged actions, decoding every step (a delta decoder starts from
    o₀). Horizons longer than the longest stored episode are dropped. `options` overrides the model's
    loop options (e.g. the certified exit); `chain` starts each step's loop from the previous step's exit
    state (a warm start, `WorldModel.imagine`) instead of zeros. `depth_step1` holds the first step's
    `depth_stats`: loops used against the true observation error, and the AUROC of the bound and the error head
    at flagging its top 10%.
    """
    wm.eval()
    longest = max(len(ep["rewards"]) for ep in data.episodes())
    horizons = [h for h in horizons if h <= longest]
    if not horizons:
        raise ValueError(f"held-out episodes are too short ({longest} steps) for any requested horizon")
    batch = data.sample(sequences, max(horizons), np.random.default_rng(seed))
    device = wm.device
    obs = batch["obs"].to(device).float()
    stats = data.stats()
    mean = (obs_mean if obs_mean is not None else stats["obs_mean"]).to(device)
    var = (obs_var if obs_var is not None else stats["obs_std"].pow(2)).to(device)
    if wm.spec.pixels:  # many pixels never change: normalise frames by the variance over all pixels
        var = var.expand(wm.spec.obs_shape).mean().expand(wm.spec.obs_shape)
    var = var.clamp_min(1e-8)
    out = wm.imagine(
        wm.encode(obs[0]),
        batch["actions"].to(device).float(),
        decode="all",
        keep_traces=True,
        options=options,
        obs=obs[0],
        chain=chain,
    )
    true = obs[1:]
    model_err = _norm_sq_error(out.obs, true, var)  # [H, B]
    mean_err = _norm_sq_error(mean.expand_as(true), true, var)
    still_err = _norm_sq_error(obs[0].expand_as(true), true, var)
    rewards = batch["rewards"].to(device).float()
    cont_true = 1.0 - batch["terminated"].to(device).float()
    result: dict[str, Any] = {"horizons": {}, "sequences": int(obs.shape[1])}
    for h in horizons:
        result["horizons"][str(h)] = {
            "model": float(model_err[h - 1].mean()),
            "predict_mean": float(mean_err[h - 1].mean()),
            "no_change": float(still_err[h - 1].mean()),
            "reward_mse": float((out.rewards[:h] - rewards[:h]).pow(2).mean()),
            "reward_mse_predict_mean": float((rewards[:h] - stats["reward_mean"].to(device)).pow(2).mean()),
            "continue_accuracy": float(((out.continues[:h] > 0.5).float() == cont_true[:h]).float().mean()),
            "loops_mean": float(out.loops[:h].float().mean()),
        }
    depth = depth_stats(model_err[0], out.loops[0], confidence_signals(wm, out.traces[0]))
    result["depth_step1"] = depth
    spear = depth["spearman_loops_error"]
    result["loops_error_spearman_step1"] = float("nan") if spear is None else spear
    result["kappa"] = wm.certified_lipschitz()
    return result


def format_table(result: dict[str, Any]) -> str:
    """A terminal table of `prediction_errors` output; errors to 3 significant digits, so that a small one
    (Pendulum's 1-step error is near 1e-4) does not print as zero."""
    rows = [
        f"{'horizon':>7} | {'model':>8} | {'mean':>8} | {'no-change':>9} | {'reward mse':>10} | "
        f"{'cont acc':>8} | {'loops':>5}"
    ]
    rows.append("-" * len(rows[0]))
    for h, r in result["horizons"].items():
        rows.append(
            f"{h:>7} | {r['model']:8.3g} | {r['predict_mean']:8.3g} | {r['no_change']:9.3g} | "
            f"{r['reward_mse']:10.3g} | {r['continue_accuracy']:8.3f} | {r['loops_mean']:5.2f}"
        )
    rows.append(f"certified kappa = {result['kappa']:.4f}; errors are MSE / per-dimension variance")
    signals = [(name, result["depth_step1"].get(f"auroc_{key}")) for key, name in CONFIDENCE_NAMES.items()]
    shown = [f"{name} {value:.2f}" for name, value in signals if value is not None]
    if shown:
        rows.append(f"AUROC flagging the top-10% step-1 errors: {', '.join(shown)} (0.5 is chance)")
    return "\n".join(rows)


CONFIDENCE_NAMES = {"head": "error head", "agreement": "readout disagreement", "bound": "certified bound"}
"""The confidence signals of `depth.confidence_signals`, as the terminal table names them."""
