"""`loopwm analyze`: run the nine stability analyses and write report.json, one PNG each and report.md.

`analyze` takes a model and plain tensors, so it is testable without files; `loopwm.app.analyze` loads a checkpoint
and a saved replay buffer for the command line first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from loopwm.analysis import sections as S
from loopwm.analysis.figures import FIGURES
from loopwm.analysis.sections import Settings
from loopwm.analysis.stats import to_json
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel


@contextlib.contextmanager
def _analysis_mode(threads: int, *models: Optional[torch.nn.Module]) -> Iterator[None]:
    """Models in eval mode and torch on `threads` intra-op threads for the duration; both restored after.

    The analyses run many small batched ops, for which extra threads mostly add contention on a shared CPU.
    """
    present = [m for m in models if m is not None]
    modes, before = [m.training for m in present], torch.get_num_threads()
    for m in present:
        m.eval()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for m, mode in zip(present, modes):
            m.train(mode)


@torch.no_grad()
def analyze(
    wm: WorldModel,
    obs: Tensor,
    actions: Tensor,
    out_dir: str | Path,
    *,
    rewards: Optional[Tensor] = None,
    compare: Optional[WorldModel] = None,
    settings: Optional[Settings] = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Run every analysis on sequences `obs` `[L+1, B, ...]`, `actions` `[L, B, A]` (and optionally `rewards`
    `[L, B]`); write report.json, the figures and report.md into `out_dir` and return the report.

    `compare` is a second model (e.g. a paper-mode ablation) rolled out beside this one in the long-horizon analysis.
    """
    for model in (wm, compare):
        if model is not None and (not model.cfg.shared or model.cfg.dynamics != "loop"):
            raise ValueError(
                "the stability report audits one shared block's fixed point; a model with model.shared=false "
                "(a different map every loop) or model.dynamics='mlp' (no loop) has none"
            )
    if compare is not None and compare.spec != wm.spec:
        raise ValueError(
            f"the compared model was built for other spaces ({compare.spec.obs_shape}, {compare.spec.action_dim} "
            f"actions) than this one ({wm.spec.obs_shape}, {wm.spec.action_dim}): compare models of one environment"
        )
    settings = settings or Settings()
    out = Path(out_dir)
    start = time.perf_counter()
    report: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with _analysis_mode(settings.threads, wm, compare):
        probe = S.build_probe(wm, obs, actions, settings, rewards, compare)
        seconds["probe"] = time.perf_counter() - start
        for name, section in S.SECTIONS.items():
            tick = time.perf_counter()
            report[name] = section(probe)
            seconds[name] = time.perf_counter() - tick
    report["meta"] = {
        "settings": dataclasses.asdict(settings),
        "samples": int(probe.tr.z.shape[0]),
        "sequences": list(actions.shape[:2]),
        "train_loops": probe.T0,
        "sweep_max_loops": probe.T_max,
        "block_depth": wm.cfg.block_depth,
        "seconds": time.perf_counter() - start,
        "section_seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)  # only now that every section ran: a failure leaves no empty folder
    if figures:
        report["meta"]["figures"] = {
            name: draw(report[name], out / f"{name}.png").name for name, draw in FIGURES.items()
        }
    report = to_json(report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return report


def _f(x: Any, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    """A readable summary: the key number of each analysis, followed by its figure."""
    c, v, a = report["certificate"], report["convergence"], report["agreement"]
    sw, o, er = report["loop_sweep"], report["oscillation"], report["effective_rank"]
    pi, lh, pa, ex = report["path_independence"], report["long_horizon"], report["pareto"], report["exits"]
    fit = sw["fit"]
    figs = report["meta"].get("figures", {})
    lines = {
        "certificate": [
            f"Certified κ = {_f(c['kappa'], '.4f')} (max Ā = {_f(c['max_retention'], '.4f')}, block gain "
            f"s = {_f(c['block_scale'], '.4f')}, per-layer σ_max = "
            f"{', '.join(_f(x, '.4f') for x in c['layer_sigma'])}).",
            f"Empirical contraction ratio: median {_f(c['ratio_median'])}, max {_f(c['ratio_max'])}; "
            f"fraction above κ {_f(c['ratio_above_kappa'])}.",
            f"At h*: max ‖J‖₂ = {_f(c['jacobian_norm_max'])}, max ρ(J) = {_f(c['jacobian_radius_max'])}, "
            f"Hutchinson ‖J‖²_F/d = {_f(c['hutchinson_mean'])} (STARS, arXiv 2605.26733).",
        ],
        "convergence": [
            f"Median loops until ‖Δ_t‖/‖h_t‖ ≤ 0.03 (Huginn, arXiv 2502.05171): {_f(v['loops_to_3pct_median'])}.",
            f"A-posteriori bound ≥ true distance in {_f(v['bound_valid_fraction'])} of (loop, sample) pairs; "
            f"median bound/distance {_f(v['bound_tightness_median'])}.",
        ],
        "agreement": [
            f"Median prediction depth {_f(a['depth_median'])} of {len(a['loops'])} loops (δ = {_f(a['delta'])}, "
            f"{_f(a['delta_rel'])} × the median final error).",
            f"AUROC for flagging the top-10% errors at {a['operating_loops']} loops: residual "
            f"{_f(a['auroc_residual'], '.3f')}, intermediate/final disagreement (PABEE) "
            f"{_f(a['auroc_agreement'], '.3f')}.",
            f"Certified exit: {_f(a['certified_mean_loops'])} loops on average; Spearman(loops used, error) = "
            f"{_f(a['spearman_loops_error'], '.3f')}.",
        ],
        "loop_sweep": [
            f"Latent error fit a + b·exp(−T/τ): a = {_f(fit['a'])}, b = {_f(fit['b'])}, τ = {_f(fit['tau'])} loops.",
            f"Best T = {_f(fit['best_T'])} (trained around {sw['train_loops']}); error "
            f"{'regresses' if fit['regresses'] else 'does not regress'} past it (by {_f(fit['regression'])}).",
        ]
        + (
            [
                f"Reward RMS error at T = 1 / {len(sw['loops'])}: {_f(sw['reward_error'][0])} / "
                f"{_f(sw['reward_error'][-1])}."
            ]
            if sw["reward_error"]
            else []
        ),
        "oscillation": [
            f"Step cosine over resolved loops: median {_f(o['cosine_median'], '.3f')}, negative (flipping) in "
            f"{_f(o['negative_cosine_fraction'])} of them; fraction of samples at a fixed "
            f"point (period 1) {_f(o['fixed_point_fraction'])}; period counts (0 = none ≤ max) "
            f"{o['period_counts']}."
        ],
        "effective_rank": [
            f"Effective rank (Roy & Vetterli 2007) of loop states at the last loop {_f(er['state_rank'][-1])} of "
            f"{er['state_dim']}; readouts {_f(er['readout_rank'][-1])}; true next latents {_f(er['target_rank'])}."
        ],
        "path_independence": [
            f"Relative spread of states from {pi['starts']} random + zero + warm starts (Anil et al. 2022): "
            f"{_f(pi['spread_at_operating'])} at the training loop count, {_f(pi['spread_final'])} at the last loop.",
            f"Spearman(spread, error) = {_f(pi['spearman_spread_error'], '.3f')}; error from zero/warm/random starts "
            f"{_f(pi['error_zero_start'])} / {_f(pi['error_warm_start'])} / {_f(pi['error_random_start'])}.",
        ],
        "long_horizon": [
            f"{lh['model']['steps'][-1]}-step rollouts: max ‖h‖ = {_f(lh['model']['state_norm_max'])}, "
            f"all finite: {lh['model']['finite']}, Lyapunov-like rate {_f(lh['model']['lyapunov_median'])} per step."
        ]
        + (
            [
                f"Comparison model (κ = {_f(lh['compare_kappa'], '.3f')}): max ‖h‖ = "
                f"{_f(lh['compare']['state_norm_max'])}, finite: {lh['compare']['finite']}, rate "
                f"{_f(lh['compare']['lyapunov_median'])} per step."
            ]
            if "compare" in lh
            else []
        ),
        "pareto": [
            "Pareto-optimal settings (mean loops → error): "
            + "; ".join(
                f"{name} {_f(r['setting'])}: {_f(r['mean_loops'])} → {_f(r['error'])}"
                for name, rows in pa.items()
                for r in rows
                if r["pareto"]
            )
            + "."
        ],
        "exits": [
            f"{name}: {_f(r['mean_loops'])} loops, error {_f(r['error_mean'])}, Spearman(loops used, error) "
            f"{_f(r['spearman_loops_error'], '.3f')}; AUROC for the top-10% errors: bound "
            f"{_f(r['auroc_bound'], '.3f')}, readout disagreement {_f(r.get('auroc_agreement'), '.3f')}, error head "
            f"{_f(r.get('auroc_head'), '.3f')}."
            for name, r in ex.items()
        ],
    }
    out = [
        "# Stability report",
        "",
        f"{report['meta']['samples']} one-step transitions; trained around {report['meta']['train_loops']} loops; "
        f"analysis took {report['meta']['seconds']:.1f} s.",
        "",
    ]
    for i, name in enumerate(S.SECTIONS, 1):
        out += [f"## {i}. {name.replace('_', ' ')}", ""] + [f"- {line}" for line in lines[name]] + [""]
        if name in figs:
            out += [f"![{name}]({figs[name]})", ""]
    return "\n".join(out)


def sample_sequences(buffer: ReplayBuffer, batch: int, length: int, seed: int = 0) -> dict[str, Tensor]:
    """Sample `batch` sequences from a replay buffer, as long as its episodes allow up to `length` transitions."""
    lo, hi = 2, length
    while lo < hi:  # the longest sequence length some stored episode still supports
        mid = (lo + hi + 1) // 2
        try:
            buffer.sample(1, mid, np.random.default_rng(seed))
            lo = mid
        except ValueError:
            hi = mid - 1
    return buffer.sample(batch, lo, np.random.default_rng(seed))
