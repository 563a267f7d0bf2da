"""The ten stability analyses of a looped world model, each returning a JSON-ready dict.

All work from a `Probe`: a seeded batch of one-step transitions, one long fixed-loop run from h(0) = 0 with every
state and readout kept, and a far-converged reference state h* with the last loops before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from loopwm.analysis import probe as P
from loopwm.analysis.agreement import agreement_score, prediction_depth, readout_errors, rms_distance
from loopwm.analysis.convergence import aposteriori_bound, contraction_ratios, relative_residuals, step_norms
from loopwm.analysis.cycles import detect_period, recurrence_matrix, step_cosines
from loopwm.analysis.depth import exits_section, usable_rules
from loopwm.analysis.fit import fit_saturating
from loopwm.analysis.geometry import effective_rank, path_independence
from loopwm.analysis.jacobian import hutchinson_frobenius, spectral_norm, spectral_radius
from loopwm.analysis.rollout import lyapunov_rate
from loopwm.analysis.stats import auroc, quartiles, spearman, top_fraction
from loopwm.exits import LoopOptions
from loopwm.world_model import WorldModel


@dataclass
class Settings:
    """Sizes and thresholds of the analyses; the defaults keep a Pendulum-sized model to a few CPU minutes."""

    samples: int = 512  # one-step transitions analysed
    train_loops: Optional[int] = None  # the loop count the model was trained around (default: model.loops)
    sweep_factor: int = 4  # loop sweep T = 1 .. sweep_factor × train_loops
    convergence_loops: int = 48  # loops kept for residual, bound and oscillation plots
    reference_loops: int = 400  # further loops to reach the reference fixed point h*
    jacobian_samples: int = 64
    power_iters: int = 30
    probes: int = 8  # Hutchinson probes
    delta: float = 0.1  # prediction-depth tolerance, as a fraction of the median final error vs truth
    flag_fraction: float = 0.1  # "true errors" to flag: the top 10%
    starts: int = 8  # random initial states for path independence
    horizon: int = 1000
    rollouts: int = 16
    perturbation: float = 1e-2  # initial latent offset for the Lyapunov-like rate, relative to ‖z‖
    divergence_window: tuple[float, float] = (1e-4, 0.5)  # relative ‖δ‖ range the rate is fitted over
    max_period: int = 8
    period_tol: float = 1e-3
    tolerances: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    gate_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    rel_tolerances: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # relative exit: × predicted error
    agreement_tolerances: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # agreement exit: RMS readout change
    seed: int = 0
    threads: int = 1  # torch intra-op threads while analysing (0: leave as is); the ops are small


@dataclass
class Probe:
    """Shared inputs of the per-step analyses."""

    wm: WorldModel
    settings: Settings
    tr: P.Transitions
    run: P.LoopRun  # T_run = max(sweep, convergence_loops) loops from zeros
    tail: Tensor  # the last 2·max_period + 1 states before h*, [2p+1, N, H]
    h_star: Tensor  # [N, H]
    errors: Tensor  # [T_max, N] RMS latent error of the readout after each loop
    T0: int
    T_max: int
    obs: Tensor  # the sequences themselves, for the long-horizon rollouts
    actions: Tensor
    compare: Optional[WorldModel] = None

    @property
    def floor(self) -> float:
        """Relative size below which an update is rounding noise in the run's dtype."""
        return 100.0 * torch.finfo(self.run.states.dtype).eps


def build_probe(
    wm: WorldModel,
    obs: Tensor,
    actions: Tensor,
    settings: Settings,
    rewards: Optional[Tensor] = None,
    compare: Optional[WorldModel] = None,
) -> Probe:
    """Sample transitions, run the long loop and converge to h*: the shared work of every section."""
    tr = P.transitions(wm, obs, actions, settings.samples, settings.seed, rewards)
    T0 = settings.train_loops or wm.cfg.loops
    T_max = settings.sweep_factor * T0
    ctx = P.context(wm, tr.z, tr.action)
    run = P.run_loops(wm, ctx, tr.z, max(T_max, settings.convergence_loops))
    tail_len = 2 * settings.max_period
    far = P.final_state(wm, ctx, run.states[-1], max(1, settings.reference_loops - tail_len))
    tail = P.run_loops(wm, ctx, tr.z, tail_len, far).states
    errors = readout_errors(run.readouts[:T_max], tr.target)
    return Probe(wm, settings, tr, run, tail, tail[-1], errors, T0, T_max, obs, actions, compare)


def _q(x: Tensor) -> dict[str, list[float]]:
    """Per-row lower quartile, median and upper quartile of a `[T, N]` tensor, as lists."""
    lo, med, hi = quartiles(x, axis=1)
    return {"q25": lo.tolist(), "median": med.tolist(), "q75": hi.tolist()}


def certificate_section(p: Probe) -> dict[str, Any]:
    """(1) κ and its parts from the parameters, against empirical contraction ratios and Jacobians at h*."""
    s, wm = p.settings, p.wm
    cert = P.certificate(wm)
    ratios = contraction_ratios(p.run.states, floor=p.floor)
    r = ratios[torch.isfinite(ratios)]
    m = min(s.jacobian_samples, p.h_star.shape[0])
    f = P.loop_map(wm, P.context(wm, p.tr.z[:m], p.tr.action[:m]))
    g = torch.Generator().manual_seed(s.seed)
    norm = spectral_norm(f, p.h_star[:m], s.power_iters, g)
    radius = spectral_radius(f, p.h_star[:m], 2 * s.power_iters, g)
    frob = hutchinson_frobenius(f, p.h_star[:m], s.probes, g)
    counts, edges = np.histogram(r.cpu().numpy(), bins=40, range=(0.0, max(1.2 * cert["kappa"], float(r.max()))))
    return {
        **cert,
        "ratio_median": float(r.median()),
        "ratio_max": float(r.max()),
        "ratio_above_kappa": float((r > cert["kappa"]).float().mean()),
        "ratio_hist": {"counts": counts.tolist(), "edges": edges.tolist()},
        "jacobian_norm": norm.tolist(),
        "jacobian_radius": radius.tolist(),
        "hutchinson_frob2_per_dim": frob.tolist(),
        "jacobian_norm_max": float(norm.max()),
        "jacobian_radius_max": float(radius.max()),
        "hutchinson_mean": float(frob.mean()),
    }


def convergence_section(p: Probe) -> dict[str, Any]:
    """(2) Relative residual per loop and the a-posteriori bound against the true distance to h*."""
    kappa = p.wm.certified_lipschitz()
    rel = relative_residuals(p.run.states)
    below = rel <= 0.03
    first = torch.where(below.any(0), below.float().argmax(0) + 1.0, torch.full_like(rel[0], float("nan")))
    out: dict[str, Any] = {
        "loops": list(range(1, rel.shape[0] + 1)),
        "relative_residual": _q(rel),
        "loops_to_3pct_median": float(first.nanmedian()),
    }
    bound, dist = aposteriori_bound(p.run.states, kappa if kappa < 1.0 else 0.0, p.h_star)
    out["distance"] = _q(dist)
    if kappa >= 1.0:  # paper mode: no certificate, so no bound to audit
        out.update(bound=None, bound_valid_fraction=None, bound_tightness_median=None)
        return out
    slack = p.floor * p.h_star.norm(dim=-1)
    resolved = dist > slack
    out.update(
        bound=_q(bound),
        bound_valid_fraction=float((bound >= dist - slack).float().mean()),
        bound_tightness_median=float((bound[resolved] / dist[resolved]).median()) if resolved.any() else None,
    )
    return out


def agreement_section(p: Probe) -> dict[str, Any]:
    """(3) Per-loop readout error vs the final readout and vs the truth; prediction depth; confidence signals."""
    s, T0 = p.settings, p.T0
    R = p.run.readouts[: p.T_max]
    err = p.errors
    tol = s.delta * float(err[-1].median())  # relative, so depth is informative whatever the error scale
    depth = prediction_depth(R, tol)
    err0 = err[T0 - 1]
    flags = top_fraction(err0, s.flag_fraction)
    residual = step_norms(p.run.states)[T0 - 1]
    agree = agreement_score(R[: max(T0, 2)])
    err_c, loops_c = P.step_with(p.wm, p.tr, LoopOptions.from_config(p.wm.cfg, exit="certified"))
    return {
        "loops": list(range(1, p.T_max + 1)),
        "error_vs_truth": _q(err),
        "error_vs_final": _q(readout_errors(R, R[-1])),
        "delta": tol,
        "delta_rel": s.delta,
        "depth_counts": torch.bincount(depth - 1, minlength=p.T_max).tolist(),
        "depth_median": float(depth.float().median()),
        "operating_loops": T0,
        "auroc_residual": auroc(residual, flags),
        "auroc_agreement": auroc(-agree, flags),
        "certified_mean_loops": float(loops_c.float().mean()),
        "certified_error": float(err_c.mean()),
        "spearman_loops_error": spearman(loops_c, err_c),
    }


def sweep_section(p: Probe) -> dict[str, Any]:
    """(4) Error against loop count T = 1..T_max with a saturating fit, the best T and any regression past it."""
    R = p.run.readouts[: p.T_max]
    latent = p.errors.mean(1)
    obs = P.obs_errors(p.wm, R, p.tr.next_obs).mean(1)
    loops = list(range(1, p.T_max + 1))
    reward = None
    if p.tr.reward is not None:
        reward = (p.wm.predict_reward(R) - p.tr.reward).pow(2).mean(1).sqrt().tolist()
    return {
        "loops": loops,
        "latent_error": latent.tolist(),
        "obs_error": obs.tolist(),
        "reward_error": reward,
        "fit": fit_saturating(loops, latent.cpu().numpy()).to_dict(),
        "obs_fit": fit_saturating(loops, obs.cpu().numpy()).to_dict(),
        "train_loops": p.T0,
    }


def oscillation_section(p: Probe) -> dict[str, Any]:
    """(5) Step-direction cosines, a recurrence plot, cycle periods at h*, and per-layer residuals of the block."""
    s, wm, states = p.settings, p.wm, p.run.states
    periods = detect_period(p.tail, s.max_period, s.period_tol)
    ctx = p.run.ctx
    layers = [wm.core.block.layer_outputs(h, ctx.block_ctx, ctx.weights) for h in states]
    per_layer = [relative_residuals(torch.stack([outs[i] for outs in layers])) for i in range(len(layers[0]))]
    scale = p.h_star[0].norm().clamp_min(1e-12)
    cos = step_cosines(states, floor=p.floor)
    resolved = cos[torch.isfinite(cos)]
    return {
        "loops": list(range(2, states.shape[0])),
        "step_cosine": _q(cos),
        "cosine_median": float(resolved.median()) if resolved.numel() else None,
        "negative_cosine_fraction": float((resolved < 0).float().mean()) if resolved.numel() else None,
        "recurrence_sample0": (recurrence_matrix(states[:, :1])[0] / scale).tolist(),
        "period_counts": torch.bincount(periods, minlength=s.max_period + 1).tolist(),
        "fixed_point_fraction": float((periods == 1).float().mean()),
        "layer_relative_residual_median": [quartiles(x, axis=1)[1].tolist() for x in per_layer],
    }


def effective_rank_section(p: Probe) -> dict[str, Any]:
    """(6) Effective rank (Roy & Vetterli 2007) of the batch of loop states and readouts after every loop."""
    states, R = p.run.states, p.run.readouts
    return {
        "loops": list(range(1, R.shape[0] + 1)),
        "state_rank": [effective_rank(h, center=True) for h in states[1:]],
        "readout_rank": [effective_rank(z, center=True) for z in R],
        "target_rank": effective_rank(p.tr.target, center=True),
        "state_dim": int(states.shape[-1]),
    }


def path_independence_section(p: Probe) -> dict[str, Any]:
    """(7) Spread of the states reached from K random starts, the zero start and a warm start (Anil et al. 2022)."""
    s, wm, tr = p.settings, p.wm, p.tr
    n, k = tr.z.shape[0], s.starts + 2
    g = torch.Generator().manual_seed(s.seed + 1)
    noise = torch.randn(s.starts, *p.h_star.shape, generator=g).to(p.h_star)
    noise = noise / noise.norm(dim=-1, keepdim=True) * p.h_star.norm(dim=-1, keepdim=True)
    warm = P.final_state(wm, P.context(wm, tr.prev_z, tr.prev_action), torch.zeros_like(p.h_star), p.T0)
    h0 = torch.cat([torch.zeros_like(p.h_star)[None], warm[None], noise]).reshape(k * n, -1)
    zs = torch.cat([tr.z] * k)
    ctx = P.context(wm, zs, torch.cat([tr.action] * k))
    run = P.run_loops(wm, ctx, zs, p.T_max, h0)
    states = run.states.reshape(p.T_max + 1, k, n, -1)
    spread = [path_independence(h).pairwise for h in states[1:]]
    err = readout_errors(run.readouts[p.T0 - 1].reshape(k, n, -1), tr.target).reshape(k, n)
    err0 = p.errors[p.T0 - 1]
    flags = top_fraction(err0, s.flag_fraction)
    return {
        "loops": list(range(1, p.T_max + 1)),
        "spread": _q(torch.stack(spread)),
        "starts": s.starts,
        "spread_at_operating": float(spread[p.T0 - 1].median()),
        "spread_final": float(spread[-1].median()),
        "spearman_spread_error": spearman(spread[p.T0 - 1], err0),
        "auroc_spread": auroc(spread[p.T0 - 1], flags),
        "error_zero_start": float(err[0].mean()),
        "error_warm_start": float(err[1].mean()),
        "error_random_start": float(err[2:].mean()),
    }


@torch.no_grad()
def rollout_stats(wm: WorldModel, obs: Tensor, actions: Tensor, settings: Settings) -> dict[str, Any]:
    """Loop-state norm, prediction error and divergence of two nearby latent rollouts along `actions` `[H, B, ...]`."""
    g = torch.Generator().manual_seed(settings.seed + 2)
    z0 = wm.encode(obs[0])
    out = wm.imagine(z0, actions, decode="none", keep_traces=True)
    u = torch.randn(z0.shape, generator=g).to(z0)
    scale = z0.norm(dim=-1, keepdim=True)
    near = wm.imagine(z0 + settings.perturbation * scale * u / u.norm(dim=-1, keepdim=True), actions, decode="none")
    h_norm = torch.stack([t.final_state.norm(dim=-1) for t in out.traces])
    known = min(obs.shape[0] - 1, actions.shape[0])
    truth = wm.encode(obs[1 : known + 1])
    latent_err = rms_distance(out.latents[1 : known + 1], truth)
    obs_err = P.obs_errors(wm, out.latents[1 : known + 1], obs[1 : known + 1])
    delta = (out.latents - near.latents).norm(dim=-1).clamp_min(1e-30)
    lo, hi = settings.divergence_window
    size = float(scale.median())
    rate = lyapunov_rate(out.latents, near.latents, floor=lo * size, ceiling=hi * size)
    return {
        "steps": list(range(1, actions.shape[0] + 1)),
        "state_norm": _q(h_norm),
        "loops_mean": out.loops.float().mean(1).tolist(),
        "known_steps": known,
        "latent_error": _q(latent_err),
        "obs_error": _q(obs_err),
        "log_delta": _q(delta.log()),
        "lyapunov_median": float(rate.nanmedian()),
        "lyapunov": rate.tolist(),
        "state_norm_max": float(h_norm.max()),
        "finite": bool(torch.isfinite(out.latents).all()),
    }


def long_horizon_section(p: Probe) -> dict[str, Any]:
    """(8) Rollouts to `horizon` steps: data actions while the sequences last, then random ones; optional comparison."""
    wm, settings = p.wm, p.settings
    device = wm.obs_mean.device
    b = min(settings.rollouts, p.obs.shape[1])
    obs, acts = torch.as_tensor(p.obs)[:, :b].to(device), torch.as_tensor(p.actions)[:, :b].to(device)
    if acts.shape[0] < settings.horizon:
        g = torch.Generator().manual_seed(settings.seed + 3)
        acts = torch.cat([acts, P.random_actions(wm, acts, settings.horizon - acts.shape[0], g)])
    acts = acts[: settings.horizon]
    out = {"model": rollout_stats(wm, obs, acts, settings), "kappa": wm.certified_lipschitz()}
    if p.compare is not None:
        other = p.compare.obs_mean.device
        out["compare"] = rollout_stats(p.compare, obs.to(other), acts.to(other), settings)
        out["compare_kappa"] = p.compare.certified_lipschitz()
    return out


def _front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (compute, error) points no other point beats on both axes."""
    return [not any(c2 <= c and e2 <= e and (c2, e2) != (c, e) for c2, e2 in points) for c, e in points]


def pareto_section(p: Probe) -> dict[str, Any]:
    """(9) Compute (mean loops) against accuracy: fixed loop counts, certified, relative and agreement exit
    tolerances, gate thresholds."""
    s = p.settings
    rules = ("fixed", "certified", "gate", "relative", "agreement")
    series: dict[str, list[dict[str, float]]] = {name: [] for name in rules}
    for t, e in zip(range(1, p.T_max + 1), p.errors.mean(1).tolist()):
        series["fixed"].append({"setting": float(t), "mean_loops": float(t), "error": e})
    sweeps = (
        ("certified", "tol", s.tolerances),
        ("gate", "gate_threshold", s.gate_thresholds),
        ("relative", "rel_tol", s.rel_tolerances),
        ("agreement", "tol", s.agreement_tolerances),
    )
    for name, key, values in sweeps:
        if name not in usable_rules(p.wm):
            continue
        for v in values:
            err, loops = P.step_with(p.wm, p.tr, LoopOptions.from_config(p.wm.cfg, exit=name, min_loops=1, **{key: v}))
            series[name].append(
                {"setting": float(v), "mean_loops": float(loops.float().mean()), "error": float(err.mean())}
            )
    points = [(q["mean_loops"], q["error"]) for rows in series.values() for q in rows]
    front = iter(_front(points))
    for rows in series.values():
        for q in rows:
            q["pareto"] = next(front)
    return series


SECTIONS: dict[str, Callable[[Probe], dict[str, Any]]] = {
    "certificate": certificate_section,
    "convergence": convergence_section,
    "agreement": agreement_section,
    "loop_sweep": sweep_section,
    "oscillation": oscillation_section,
    "effective_rank": effective_rank_section,
    "path_independence": path_independence_section,
    "long_horizon": long_horizon_section,
    "pareto": pareto_section,
    "exits": exits_section,
}
