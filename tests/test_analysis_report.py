"""The `loopwm analyze` report on a tiny random model: files are written and report.json holds the recomputed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loopwm.analysis.agreement import readout_errors
from loopwm.analysis.convergence import relative_residuals, step_norms
from loopwm.analysis.fit import fit_saturating
from loopwm.analysis.geometry import effective_rank
from loopwm.analysis.report import analyze
from loopwm.analysis.sections import SECTIONS, Settings, build_probe
from loopwm.analysis.stats import auroc, quartiles, spearman, top_fraction
from loopwm.app.analyze import analyze_checkpoint
from loopwm.checkpoint import save
from loopwm.config import ConfigError, from_dict, to_dict
from loopwm.exits import LoopOptions
from loopwm.lipschitz import exact_spectral_norm
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel
from tests.helpers import box_spaces, tiny_config

SMALL = Settings(
    samples=64,
    convergence_loops=12,
    reference_loops=60,
    jacobian_samples=8,
    power_iters=10,
    probes=4,
    starts=3,
    horizon=40,
    rollouts=4,
    max_period=4,
    tolerances=(1e-3, 1e-1),
    gate_thresholds=(0.3, 0.7),
)


def _model(**model) -> WorldModel:
    return WorldModel.from_config(tiny_config(**model), *box_spaces()).eval()


def _data(length: int = 12, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(length + 1, batch, 3, generator=g).cumsum(0) * 0.3
    actions = torch.rand(length, batch, 1, generator=g) * 2 - 1
    return obs, actions, torch.randn(length, batch, generator=g)


def _no_nan(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"report.json holds {name}, which strict JSON forbids")

    return json.loads(text, parse_constant=refuse)


def test_analyze_writes_files_and_reports_recomputed_values(tmp_path):
    wm = _model()
    obs, actions, rewards = _data()
    report = analyze(wm, obs, actions, tmp_path, rewards=rewards, compare=_model(constrain_block=False), settings=SMALL)
    for name in SECTIONS:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert f"]({name}.png)" in (tmp_path / "report.md").read_text()
    stored = _no_nan((tmp_path / "report.json").read_text())
    assert stored == json.loads(json.dumps(report))

    p = build_probe(wm, obs, actions, SMALL)
    cert = stored["certificate"]
    assert cert["kappa"] == pytest.approx(wm.certified_lipschitz(), rel=1e-6)
    sigmas = [exact_spectral_norm(lin.effective_weight()) for lin in wm.core.block.linears()]
    assert cert["layer_sigma"] == pytest.approx(sigmas, rel=1e-6)
    assert max(cert["jacobian_norm"]) <= cert["kappa"] + 1e-4 and cert["ratio_above_kappa"] == 0.0

    T0, T_max = wm.cfg.loops, 4 * wm.cfg.loops
    err = readout_errors(p.run.readouts[:T_max], p.tr.target)
    sweep = stored["loop_sweep"]
    assert sweep["latent_error"] == pytest.approx(err.mean(1).tolist(), rel=1e-5)
    fit = fit_saturating(range(1, T_max + 1), err.mean(1).numpy())
    assert sweep["fit"]["tau"] == pytest.approx(fit.tau, rel=1e-3) and sweep["fit"]["best_T"] == fit.best_T
    assert [r["error"] for r in stored["pareto"]["fixed"]] == pytest.approx(sweep["latent_error"])
    assert len(sweep["reward_error"]) == T_max

    rel_median = quartiles(relative_residuals(p.run.states), axis=1)[1]
    assert stored["convergence"]["relative_residual"]["median"] == pytest.approx(rel_median.tolist(), rel=1e-5)
    assert stored["convergence"]["bound_valid_fraction"] == 1.0

    agree = stored["agreement"]
    flags = top_fraction(err[T0 - 1], SMALL.flag_fraction)
    assert agree["auroc_residual"] == pytest.approx(auroc(step_norms(p.run.states)[T0 - 1], flags))
    z1, trace = wm.step(p.tr.z, p.tr.action, options=LoopOptions.from_config(wm.cfg, exit="certified"))
    expected = spearman(trace.loops_used, (z1 - p.tr.target).pow(2).mean(-1).sqrt())
    assert agree["spearman_loops_error"] == pytest.approx(expected) or (
        math.isnan(expected) and agree["spearman_loops_error"] is None
    )
    assert sum(agree["depth_counts"]) == SMALL.samples

    ranks = [effective_rank(h, center=True) for h in p.run.states[1:]]
    assert stored["effective_rank"]["state_rank"] == pytest.approx(ranks, rel=1e-6)
    assert sum(stored["oscillation"]["period_counts"]) == SMALL.samples
    assert stored["path_independence"]["spread_final"] < stored["path_independence"]["spread"]["median"][0]

    horizon = stored["long_horizon"]
    assert len(horizon["model"]["steps"]) == SMALL.horizon and horizon["model"]["finite"]
    assert "compare" in horizon and horizon["model"]["known_steps"] == obs.shape[0] - 1
    assert horizon["model"]["lyapunov_median"] < 0


def test_analyze_checkpoint_uses_the_runs_held_out_split_and_handles_uncertified_model(tmp_path):
    cfg = from_dict(
        {
            "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "constrain_block": False},
            "data": {"path": str(tmp_path / "data.npz")},
            "train": {"val_fraction": 0.34, "loop_mean": 2.0},
        }
    )
    wm = WorldModel.from_config(cfg, *box_spaces())
    with torch.no_grad():
        wm.core.gain_logit.fill_(3.0)
    assert wm.certified_lipschitz() > 1.0
    save(tmp_path / "run.pt", wm, config=to_dict(cfg))
    save(tmp_path / "bare.pt", wm)
    obs, actions, rewards = _data(length=10, batch=3, seed=1)
    buffer = ReplayBuffer((3,), 1, capacity=100)
    done = np.eye(10, dtype=bool)[-1]
    for b in range(3):
        buffer.add_episode(obs[:, b].numpy(), actions[:, b].numpy(), rewards[:, b].numpy(), done, np.zeros(10, bool))
    buffer.save(tmp_path / "data.npz")
    fields = {
        k: getattr(SMALL, k)
        for k in (
            "samples",
            "convergence_loops",
            "reference_loops",
            "jacobian_samples",
            "power_iters",
            "probes",
            "starts",
            "horizon",
            "rollouts",
        )
    }
    report = analyze_checkpoint(tmp_path / "run.pt", None, tmp_path / "out", sequences=3, **fields)
    assert (tmp_path / "out" / "report.json").is_file()
    assert report["convergence"]["bound"] is None and report["long_horizon"]["model"]["known_steps"] == 10
    assert report["meta"]["sequences"] == [10, 3] and report["meta"]["train_loops"] == 2
    with pytest.raises(ValueError, match="unknown analysis setting 'loopz'"):
        analyze_checkpoint(tmp_path / "run.pt", None, tmp_path / "out", loopz=3)
    with pytest.raises(ConfigError, match="pass --data"):
        analyze_checkpoint(tmp_path / "bare.pt", None, tmp_path / "out")


def test_analyze_reads_out_a_residual_latent_as_a_change_from_its_step_start(tmp_path):
    """The shipped Pendulum design (residual latent, delta decoder): every readout is z + C(h), from each
    sample's own start latent, so the probe's per-loop readouts end at what `step` predicts."""
    wm = _model(latent_update="residual", obs_decoder="delta")
    obs, actions, rewards = _data()
    report = analyze(wm, obs, actions, tmp_path, rewards=rewards, settings=SMALL)
    assert {"agreement", "exits", "pareto"} <= set(report) and report["pareto"]["agreement"]
    p = build_probe(wm, obs, actions, SMALL)
    with torch.no_grad():
        z1, _ = wm.step(p.tr.z, p.tr.action, options=LoopOptions(loops=wm.cfg.loops))
    torch.testing.assert_close(p.run.readouts[wm.cfg.loops - 1], z1)


def test_a_failing_report_writes_nothing_and_a_compared_model_of_other_spaces_is_refused(tmp_path, monkeypatch):
    obs, actions, _ = _data()
    other = WorldModel.from_config(tiny_config(), *box_spaces(obs_dim=4)).eval()
    with pytest.raises(ValueError, match="compared model was built for other spaces"):
        analyze(_model(), obs, actions, tmp_path / "report", compare=other, settings=SMALL)
    assert not (tmp_path / "report").exists()

    def broken(probe):
        raise RuntimeError("a section failed")

    monkeypatch.setitem(SECTIONS, "certificate", broken)  # the first section: fails before any real work
    with pytest.raises(RuntimeError, match="a section failed"):
        analyze(_model(), obs, actions, tmp_path / "report", settings=SMALL)
    assert not (tmp_path / "report").exists()  # no empty folder left behind
