"""Benchmark scripts run end to end on tiny sizes, and score their variants the way `loopwm eval` does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopwm.analysis.prediction import prediction_errors
from tests.helpers import tiny_model
from tests.test_training import linear_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import param_efficiency as pe  # noqa: E402
from obs_mlp import ObsMLP, fit_obs_mlp  # noqa: E402


def test_param_efficiency_smoke_writes_every_variant(tmp_path):
    cmd = [
        sys.executable,
        "benchmarks/param_efficiency.py",
        "--smoke",
        "--out",
        str(tmp_path),
        "--docs",
        str(tmp_path),
        "--variants",
        "loopwm",
        "obs-mlp",
        "delta",
        "--define",
        "delta=model.obs_decoder=delta",
        "--seeds",
        "0",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "param_efficiency.json").read_text())
    variants = data["protocols"]["smoke"]["tasks"]["pendulum"]["variants"]
    assert set(variants) == {"loopwm", "obs-mlp", "delta"}
    assert variants["delta"]["overrides"] == ["model.obs_decoder=delta"]
    for v in variants.values():
        assert set(v["seeds"]) == {"0", "1"}
        for run in v["seeds"].values():
            assert run["parameters"] > 0 and run["macs_per_step"] > 0
            assert [c["updates"] for c in run["curve"]] == [3, 6]
            assert set(run["errors"]) == {"1", "10", "50"} and all(np.isfinite(list(run["errors"].values())))
    # the delta head adds parameters; the diagnostics are recorded for loopwm variants only
    assert variants["delta"]["seeds"]["0"]["parameters"] > variants["loopwm"]["seeds"]["0"]["parameters"]
    assert "recon_floor" in variants["loopwm"]["seeds"]["0"]["curve"][-1]
    md = (tmp_path / "param_efficiency.md").read_text()
    assert "`obs-mlp`" in md and "`delta`" in md and "reconstruction floor" in md


def test_benchmark_errors_match_prediction_errors():
    """The benchmark's scoring of a rollout is `prediction_errors`' (same sequences, same normalisation)."""
    data = linear_dataset(episodes=6, steps=60)
    stats = data.stats()
    var = stats["obs_std"].pow(2)
    wm = tiny_model()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    ref = prediction_errors(
        wm, data, pe.HORIZONS, pe.SEQUENCES, seed=pe.EVAL_SEED, obs_mean=stats["obs_mean"], obs_var=var
    )
    batch = pe.held_out(data, max(pe.HORIZONS))
    with torch.no_grad():
        pred = wm.imagine(wm.encode(batch["obs"][0]), batch["actions"], decode="all").obs
    ours = pe.horizon_means(pe.normalised_errors(pred, batch["obs"][1:], var), pe.HORIZONS)
    for h in ours:
        assert ours[h] == pytest.approx(ref["horizons"][h]["model"], rel=1e-5)
    # an MLP that predicts no change scores exactly the no-change baseline
    mlp = ObsMLP.from_data(data, 8, 2)
    with torch.no_grad():
        mlp.net[-1].weight.zero_()
        mlp.net[-1].bias.zero_()
        mlp.delta_mean.zero_()
        still = mlp.rollout(batch["obs"][0], batch["actions"])
    still_err = pe.horizon_means(pe.normalised_errors(still, batch["obs"][1:], var), pe.HORIZONS)
    for h in still_err:
        assert still_err[h] == pytest.approx(ref["horizons"][h]["no_change"], rel=1e-5)


def test_obs_mlp_learns_the_linear_system():
    torch.manual_seed(0)
    data = linear_dataset()
    mlp = ObsMLP.from_data(data, 32, 2)
    step = fit_obs_mlp(mlp, data, 32, np.random.default_rng(0), lr=3e-3)
    losses = [step() for _ in range(200)]
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
