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
    out, docs = tmp_path / "out", tmp_path / "docs"
    names = ["loopwm", "stack", "mlp-params", "mlp-flops", "obs-mlp", "absolute"]
    cmd = [
        sys.executable,
        "benchmarks/param_efficiency.py",
        "--smoke",
        "--out",
        str(out),
        "--docs",
        str(docs),
        "--variants",
        *names,
        "--define",
        "absolute=model.obs_decoder=absolute",
        "--seeds",
        "0",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    data = json.loads((docs / "param_efficiency.json").read_text())
    variants = data["protocols"]["smoke"]["tasks"]["pendulum"]["variants"]
    assert set(variants) == set(names)
    assert variants["absolute"]["overrides"] == ["model.obs_decoder=absolute"]
    for v in variants.values():
        assert set(v["seeds"]) == {"0", "1"}
        for run in v["seeds"].values():
            assert run["parameters"] > 0 and run["macs_per_step"] > 0
            assert [c["updates"] for c in run["curve"]] == [3, 6]
            assert set(run["errors"]) == {"1", "10", "50"} and all(np.isfinite(list(run["errors"].values())))
    run = {name: v["seeds"]["0"] for name, v in variants.items()}
    # the shipped delta head adds parameters; the diagnostics are recorded for loopwm variants only
    assert run["absolute"]["parameters"] < run["loopwm"]["parameters"]
    assert "recon_floor" in run["loopwm"]["curve"][-1] and "recon_floor" in run["stack"]["curve"][-1]
    # the stack pays for its distinct blocks in parameters and e-paths; each block stays a contraction
    assert run["stack"]["parameters"] > 2 * run["loopwm"]["parameters"] - 1000
    assert run["stack"]["macs_per_step"] > run["loopwm"]["macs_per_step"] and run["stack"]["kappa"] < 1
    # only the stack's first block holds a map a cold start never reaches (its h-path map on h = 0)
    assert run["loopwm"]["idle_parameters"] == run["mlp-params"]["idle_parameters"] == 0
    assert run["stack"]["idle_parameters"] == 16 * 32  # the smoke model's hidden 16 -> block width 32
    # the plain MLP cores match the shipped loopwm in what they are named after, and do not loop
    for name, key, by in [("mlp-params", "parameters", "parameters"), ("mlp-flops", "macs_per_step", "macs")]:
        assert run[name]["matched"]["by"] == by and run[name]["loops"] == 1 and run[name]["kappa"] == 0
        assert run[name][key] == pytest.approx(run["loopwm"][key], rel=0.05)
    assert run["mlp-flops"]["matched"]["width"] > run["mlp-params"]["matched"]["width"]
    md = (docs / "param_efficiency.md").read_text()
    assert "`obs-mlp`" in md and "`absolute`" in md and "reconstruction floor" in md and "dynamics_width=" in md
    # the smoke figure goes to --out, never next to the docs
    assert (out / "param_efficiency_smoke_pendulum.png").stat().st_size > 0
    assert not list(docs.glob("*.png")) and "](param_efficiency" not in md


@pytest.mark.parametrize(
    "define, message",
    [("loopwm=model.loops=2", "already defined"), ("wide", "expected NAME="), ("wide=  ", "expected NAME=")],
)
def test_param_efficiency_rejects_a_bad_define_before_writing(tmp_path, define, message):
    out, docs = tmp_path / "out", tmp_path / "docs"
    with pytest.raises(SystemExit, match=message):
        pe.main(["--smoke", "--out", str(out), "--docs", str(docs), "--define", define])
    assert list(tmp_path.iterdir()) == []


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


def test_world_model_benchmark_smoke_scores_the_default_and_every_certified_tolerance(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    cmd = [sys.executable, "benchmarks/world_model.py", "--env", "pendulum", "--budget-min", "0.03"]
    cmd += ["--quick-min", "0.02", "--steps", "400", "--num-envs", "2", "--tols", "0.1", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([*cmd, "--out", str(out), "--docs", str(docs)], cwd=REPO, env=env, check=True, timeout=300)
    result = json.loads((docs / "world_model.json").read_text())["results"]["pendulum"]
    # each half is rounded up to whole 200-step episodes on each of the 2 envs
    assert [part["transitions"] for part in result["dataset"]["parts"]] == [400, 400]
    assert result["dataset"]["transitions"] == 800 and result["training"]["checkpoint"]
    runs = [result["eval_default_exit"], *result["eval_certified_exit"]]
    assert [r.get("tol") for r in runs] == [None, 0.1, 0.01]
    for r in runs:
        assert set(r["horizons"]) == {"1", "10", "50"}
        assert all(np.isfinite(h["model"]) and h["model"] >= 0 for h in r["horizons"].values())
    assert "| 50 |" in (docs / "world_model.md").read_text()


def test_a_finished_control_run_reloaded_keeps_its_curve_and_wall_time(tmp_path):
    """`benchmarks/control.py --resume` over a run that already finished reports what it ran with, including its
    wall time, not the second or so the reload took."""
    from control import loopwm_curve

    from tests.helpers import TINY

    tiny = [f"model.{key}={value}" for key, value in TINY.items()]
    tiny += ["agent.seed_steps=20", "env.max_episode_steps=20", "planner.samples=16", "planner.policy_samples=4"]
    first = loopwm_curve("pendulum", 0, [40], 1, tmp_path, 1, tiny, resume=False)
    again = loopwm_curve("pendulum", 0, [40], 1, tmp_path, 1, tiny, resume=True)
    assert again == first and set(first["curve"]) == {40} and first["seconds"] > 0
