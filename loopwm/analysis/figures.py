"""One PNG per analysis, drawn from the section dicts written to report.json (so figures and numbers agree).

Figures are built with `matplotlib.figure.Figure`, which renders through Agg without touching pyplot's global
state, so plotting works headless and never opens a window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _band(ax: Axes, x: list, q: Optional[dict], label: str, color: Optional[str] = None) -> None:
    """Median line with a shaded interquartile band."""
    if q is None:
        return
    med = np.asarray(q["median"], dtype=float)
    (line,) = ax.plot(x[: len(med)], med, label=label, color=color)
    ax.fill_between(
        x[: len(med)],
        np.asarray(q["q25"], dtype=float),
        np.asarray(q["q75"], dtype=float),
        color=line.get_color(),
        alpha=0.25,
        linewidth=0,
    )


def _log_scale(ax: Axes) -> None:
    """Log y-axis when the plotted data has positive finite values (not, e.g., an undefined bound at κ ≥ 1)."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    if any(np.any(np.isfinite(y) & (y > 0)) for y in ys):
        ax.set_yscale("log")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def certificate_figure(sec: dict[str, Any], path: Path) -> Path:
    """Empirical contraction ratios and Jacobians at h* against κ, max Ā and the per-layer σ_max."""
    fig = Figure(figsize=(14, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    edges = np.asarray(sec["ratio_hist"]["edges"])
    ax1.stairs(sec["ratio_hist"]["counts"], edges, fill=True, alpha=0.6, label="‖Δ_{t+1}‖/‖Δ_t‖")
    for value, name, style in ((sec["kappa"], "certified κ", "-"), (sec["max_retention"], "max Ā", ":")):
        ax1.axvline(value, color="k", linestyle=style, label=f"{name} = {value:.3f}")
    ax1.set(
        xlabel="contraction ratio per loop (dimensionless)",
        ylabel="count (loops × samples)",
        title="empirical contraction vs certificate",
    )
    ax1.legend(fontsize=8)
    ax2.hist([sec["jacobian_norm"], sec["jacobian_radius"]], bins=20, label=["‖J‖₂ at h*", "ρ(J) at h*"])
    ax2.axvline(sec["kappa"], color="k", label="certified κ")
    ax2.set(
        xlabel="Jacobian norm / spectral radius (dimensionless)",
        ylabel="count (samples)",
        title=f"loop Jacobian at h* (Hutchinson ‖J‖²_F/d = {sec['hutchinson_mean']:.3g})",
    )
    ax2.legend(fontsize=8)
    sigmas = sec["layer_sigma"]
    ax3.bar(range(1, len(sigmas) + 1), sigmas)
    ax3.axhline(1.0, color="k", linestyle=":", label="σ = 1")
    ax3.set(
        xlabel="h-path layer index",
        ylabel="exact σ_max of effective weight",
        title=f"per-layer spectral norms (block gain s = {sec['block_scale']:.3f})",
    )
    ax3.legend(fontsize=8)
    return _save(fig, path)


def convergence_figure(sec: dict[str, Any], path: Path) -> Path:
    """Relative residual per loop, and the a-posteriori bound against the true distance to h*."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    _band(ax1, sec["loops"], sec["relative_residual"], "‖Δ_t‖/‖h_t‖")
    ax1.axhline(0.03, color="k", linestyle=":", label="Huginn exit threshold 0.03")
    _log_scale(ax1)
    ax1.set(xlabel="loop t", ylabel="relative residual (dimensionless)", title="convergence per loop")
    ax1.legend(fontsize=8)
    _band(ax2, sec["loops"], sec["bound"], "a-posteriori bound κ/(1−κ)‖Δ_t‖")
    _band(ax2, sec["loops"], sec["distance"], "true distance ‖h_t − h*‖")
    _log_scale(ax2)
    ax2.set(xlabel="loop t", ylabel="distance to fixed point (latent units)", title="certified bound vs true distance")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def agreement_figure(sec: dict[str, Any], path: Path) -> Path:
    """Per-loop readout error against the truth and the final readout, and the prediction-depth histogram."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    _band(ax1, sec["loops"], sec["error_vs_truth"], "vs ground truth")
    before_final = {k: v[:-1] for k, v in sec["error_vs_final"].items()}
    _band(ax1, sec["loops"], before_final, "vs final readout")
    ax1.axvline(sec["operating_loops"], color="k", linestyle=":", label="training loop count")
    _log_scale(ax1)
    ax1.set(
        xlabel="loop t",
        ylabel="RMS latent error (latent units)",
        title=f"AUROC top-10% errors: residual {sec['auroc_residual']:.2f}, agreement {sec['auroc_agreement']:.2f}",
    )
    ax1.legend(fontsize=8)
    ax2.bar(sec["loops"], sec["depth_counts"])
    ax2.set(
        xlabel=f"prediction depth (first loop within δ={sec['delta']:.2g} of final)",
        ylabel="count (samples)",
        title=f"Spearman(loops used, error) under certified exit: {sec['spearman_loops_error']:.2f}",
    )
    return _save(fig, path)


def sweep_figure(sec: dict[str, Any], path: Path) -> Path:
    """Error against loop count with the saturating fit a + b·exp(−T/τ) and the best T."""
    fig = Figure(figsize=(11, 4))
    T = np.asarray(sec["loops"], dtype=float)
    grid = np.linspace(T.min(), T.max(), 200)
    for ax, key, fit_key, unit in zip(
        fig.subplots(1, 2), ("latent_error", "obs_error"), ("fit", "obs_fit"), ("latent units", "observation units")
    ):
        fit = sec[fit_key]
        ax.plot(T, sec[key], "o", label="measured")
        ax.plot(
            grid,
            fit["a"] + fit["b"] * np.exp(-grid / fit["tau"]),
            label=f"fit a={fit['a']:.3g}, b={fit['b']:.3g}, τ={fit['tau']:.3g}",
        )
        ax.axvline(fit["best_T"], color="k", linestyle=":", label=f"best T = {fit['best_T']:.0f}")
        ax.axvline(sec["train_loops"], color="gray", linestyle="--", label="training loop count")
        ax.set(
            xlabel="loops T",
            ylabel=f"mean RMS one-step error ({unit})",
            title="regresses past best T" if fit["regresses"] else "no regression past best T",
        )
        ax.legend(fontsize=8)
    return _save(fig, path)


def oscillation_figure(sec: dict[str, Any], path: Path) -> Path:
    """Step-direction cosines, a recurrence plot of one sample, and per-layer residuals of the block."""
    fig = Figure(figsize=(15, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _band(ax1, sec["loops"], sec["step_cosine"], "cos(Δ_t, Δ_{t−1})")
    ax1.axhline(0.0, color="k", linewidth=0.5)
    ax1.set(
        ylim=(-1.05, 1.05),
        xlabel="loop t",
        ylabel="cosine (dimensionless)",
        title=f"step direction (fixed-point fraction {sec['fixed_point_fraction']:.2f})",
    )
    image = ax2.imshow(np.asarray(sec["recurrence_sample0"]), origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax2, label="‖h_i − h_j‖ / ‖h*‖")
    ax2.set(xlabel="loop j", ylabel="loop i", title="recurrence plot (sample 0)")
    for i, med in enumerate(sec["layer_relative_residual_median"]):
        ax3.plot(range(1, len(med) + 1), med, label=f"layer {i + 1}")
    _log_scale(ax3)
    ax3.set(xlabel="loop t", ylabel="median relative change of layer output", title="per-layer fixed points")
    ax3.legend(fontsize=8)
    return _save(fig, path)


def effective_rank_figure(sec: dict[str, Any], path: Path) -> Path:
    """Effective rank of loop states and readouts per loop, with the rank of the true next latents."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(sec["loops"], sec["state_rank"], label="loop states h_t")
    ax.plot(sec["loops"], sec["readout_rank"], label="readouts z_t")
    ax.axhline(sec["target_rank"], color="k", linestyle=":", label="true next latents")
    ax.set(xlabel="loop t", ylabel="effective rank (dimensions)", title="representation diversity per loop")
    ax.legend(fontsize=8)
    return _save(fig, path)


def path_independence_figure(sec: dict[str, Any], path: Path) -> Path:
    """Spread of states reached from different starts per loop, and the error of each kind of start."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    _band(ax1, sec["loops"], sec["spread"], f"{sec['starts']} random + zero + warm starts")
    _log_scale(ax1)
    ax1.set(
        xlabel="loop t",
        ylabel="mean pairwise distance / ‖h‖ (dimensionless)",
        title=f"path independence (Spearman with error {sec['spearman_spread_error']:.2f})",
    )
    ax1.legend(fontsize=8)
    names = ["zero", "warm", "random"]
    ax2.bar(names, [sec[f"error_{n}_start"] for n in names])
    ax2.set(xlabel="initial state", ylabel="mean RMS latent error at training loop count", title="error by start")
    return _save(fig, path)


def long_horizon_figure(sec: dict[str, Any], path: Path) -> Path:
    """Loop-state norm, prediction error and nearby-rollout divergence against horizon, for one or two models."""
    fig = Figure(figsize=(15, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for key, label in (("model", f"model (κ={sec['kappa']:.3f})"), ("compare", "comparison")):
        run = sec.get(key)
        if run is None:
            continue
        if key == "compare":
            label = f"comparison (κ={sec['compare_kappa']:.3f})"
        steps = run["steps"]
        _band(ax1, steps, run["state_norm"], label)
        _band(ax2, steps, run["latent_error"], label)
        _band(ax3, [0] + steps, run["log_delta"], f"{label}, rate {run['lyapunov_median']:.3g}/step")
    _log_scale(ax1)
    ax1.set(xlabel="rollout step", ylabel="‖h‖ at exit (latent units)", title="state norm")
    ax2.set(
        xlabel="rollout step", ylabel="RMS latent prediction error (latent units)", title="open-loop prediction error"
    )
    ax3.set(xlabel="rollout step", ylabel="log ‖z_t − z'_t‖ (log latent units)", title="divergence of nearby rollouts")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_figure(sec: dict[str, Any], path: Path) -> Path:
    """Mean loops against one-step error for fixed loop counts, certified, relative and agreement tolerances, gate
    thresholds (a report written before a rule existed has no series for it)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    markers = (("fixed", "o"), ("certified", "s"), ("gate", "^"), ("relative", "D"), ("agreement", "v"))
    for name, marker in markers:
        rows = sec.get(name, [])
        ax.plot([r["mean_loops"] for r in rows], [r["error"] for r in rows], marker, linestyle="-", label=name)
    front = sorted((r["mean_loops"], r["error"]) for rows in sec.values() for r in rows if r["pareto"])
    ax.plot(*zip(*front), "k--", linewidth=1, label="Pareto front")
    ax.set(
        xlabel="mean loops per step (compute)",
        ylabel="mean RMS one-step error (latent units)",
        title="compute vs accuracy",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def exits_figure(sec: dict[str, Any], path: Path) -> Path:
    """Per exit rule: mean loops and Spearman(loops used, error); each confidence signal's AUROC for the top 10%."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    rules = list(sec)
    x = np.arange(len(rules))
    ax1.bar(x, [sec[r]["mean_loops"] for r in rules])
    ax1.set_xticks(x, [f"{r}\nρ={_num(sec[r]['spearman_loops_error'])}" for r in rules])
    ax1.set(ylabel="mean loops per step", title="loops used, and Spearman(loops used, error)")
    signals = ("bound", "agreement", "head")
    for i, name in enumerate(signals):
        values = [sec[r].get(f"auroc_{name}") for r in rules]
        ax2.bar(x + (i - 1) * 0.27, [np.nan if v is None else v for v in values], width=0.27, label=name)
    ax2.axhline(0.5, color="k", linestyle=":", linewidth=1, label="chance")
    ax2.set_xticks(x, rules)
    ax2.set(ylim=(0, 1), ylabel="AUROC", title="flagging the top-10% errors")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


FIGURES: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "certificate": certificate_figure,
    "convergence": convergence_figure,
    "agreement": agreement_figure,
    "loop_sweep": sweep_figure,
    "oscillation": oscillation_figure,
    "effective_rank": effective_rank_figure,
    "path_independence": path_independence_figure,
    "long_horizon": long_horizon_figure,
    "pareto": pareto_figure,
    "exits": exits_figure,
}
