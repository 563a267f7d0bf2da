"""The planner benchmarks run end to end on tiny sizes: the loop-option study and the plain baseline model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopwm.agents import build_planner
from loopwm.config import from_dict, load_config
from loopwm.envs.factory import make_env
from loopwm.world_model import WorldModel
from tests.helpers import TINY_PENDULUM_RUN, save_pendulum_run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from plain_dynamics import PlainWorldModel  # noqa: E402
from planner_variants import Contender, compare  # noqa: E402


def test_planner_loops_study_writes_every_option(tmp_path):
    save_pendulum_run(tmp_path / "run.pt")
    cmd = [sys.executable, "benchmarks/planner_loops.py", str(tmp_path / "run.pt"), "--out", str(tmp_path)]
    cmd += ["--sequences", "4", "--episodes", "1", "--decisions", "2", "--return-steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "planner_loops.json").read_text())
    assert set(data["returns"]) == set(data["study"]) and set(data["study"]) < set(data["decisions"])
    assert data["decisions"]["default"]["action_diff_mean"] == 0.0
    assert data["rollouts"]["planner.loops=1"]["loops"] == 1.0 and data["rollouts"]["default"]["loops"] == 2.0
    assert "warm_start=elite, loops=1" not in data["rollouts"]  # needs a planner
    assert "Loop options for planning" in (tmp_path / "planner_loops.md").read_text()


def test_every_loop_option_compared_loads_over_the_shipped_configs():
    """Each option overrides what a config plans with: configs/pendulum.yaml sets planner.loops, which an exit
    rule that picks its own loop count must clear."""
    from planner_loops import STUDY

    for config in ("configs/pendulum.yaml", "configs/halfcheetah.yaml"):
        for label, overrides in STUDY.items():
            cfg = load_config(REPO / config, overrides)
            assert (cfg.planner.loops is None) == (label == "default" or "certified" in label), (config, label)
    from planner_speed import CONFIG, TDMPC2_OVERRIDES

    assert load_config(CONFIG, TDMPC2_OVERRIDES).planner.loops is None  # TD-MPC2's config at the model's 4 loops


def test_decision_flops_count_the_loops_the_planner_runs():
    """Pendulum's planner runs 2 of the model's 4 loops per imagined step: the useful FLOPs count 2, and at the
    model's own loops (planner.loops=null) the extra 2 loops per step appear in full for every imagined step."""
    from planner_speed import CONFIG, build, decision_flops

    from loopwm.flops import step_macs

    counts = {}
    for overrides in ([], ["planner.loops=null"]):
        cfg = load_config(CONFIG, [*overrides, "model.latent_dim=8", "model.hidden_dim=16", "model.mlp_dim=16"])
        _, wm, planner = build(cfg, True, 0)
        counts[len(overrides)] = decision_flops(wm, planner)
    assert counts[0]["loops_per_step"] == 2 and counts[1]["loops_per_step"] == 4
    p = cfg.planner
    steps = p.iterations * p.samples * p.horizon + (p.horizon - 1) * p.policy_samples
    per_step = step_macs(wm, 4)["total"] - step_macs(wm, 2)["total"]
    extra = 2 * steps * per_step / 1e9
    assert abs(counts[1]["useful_gflop"] - counts[0]["useful_gflop"] - extra) < 1e-12


def test_the_plain_model_plans_through_the_same_planner_next_to_loopwm():
    """The TD-MPC2-sized baseline gives the planner what a WorldModel gives it, so the same MPPI plans with it
    (no loops), and the side-by-side timer times both in one run."""
    cfg = from_dict({**TINY_PENDULUM_RUN, "agent": {"use_value": False, "use_policy_prior": False}})
    torch.manual_seed(0)
    plain = PlainWorldModel(3, 1, latent=16, width=32).eval()
    out = plain.imagine(plain.encode(torch.zeros(5, 3)), torch.zeros(2, 5, 1))
    assert out.latents.shape == (3, 5, 16) and out.rewards.shape == (2, 5)
    torch.testing.assert_close(out.latents[1:].view(2, 5, 2, 8).sum(-1), torch.ones(2, 5, 2))  # SimNorm groups
    contenders = [Contender("plain", make_env(cfg.env, 0), build_planner(cfg, plain, seed=0))]
    env = make_env(cfg.env, 0)
    loopwm = WorldModel.from_config(cfg, env.observation_space, env.action_space).eval()
    contenders.append(Contender("loopwm", env, build_planner(cfg, loopwm, seed=0)))
    rows = compare(contenders, repeats=2, warmup=1, baseline="plain")
    assert rows["plain"]["loops_per_step"] == 0.0 and rows["loopwm"]["loops_per_step"] == 2.0
    assert rows["plain"]["wall_ratio"] == 1.0 and np.isfinite(rows["loopwm"]["cpu_ratio"])


def test_flip_variants_change_only_what_a_built_planner_reads_each_decision():
    """benchmarks/halfcheetah_flips.py swaps planner settings on a built planner: a penalty or the sample count
    take effect, loop options and warm starts (set once, when the planner is built) are refused."""
    from halfcheetah_flips import planner_with

    cfg = load_config(REPO / "configs" / "halfcheetah.yaml")
    assert planner_with(cfg, "planner.uncertainty_penalty=0.1,planner.samples=64").samples == 64
    for text in ("planner.loops=1", "planner.warm_start=time", "planner.exit=certified"):
        with pytest.raises(SystemExit, match="cannot change between variants"):
            planner_with(cfg, text)
