"""benchmarks/atari.py on a real ALE game with a tiny run: every field of the report is filled and consistent."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loopwm.app.run import run
from loopwm.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their shared helpers as `common`


def load_script():
    spec = importlib.util.spec_from_file_location("atari_benchmark", REPO / "benchmarks" / "atari.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_atari_benchmark_reports_a_tiny_boxing_run(tmp_path):
    pytest.importorskip("ale_py", reason="the [atari] extra")
    short = ["env.max_episode_steps=60"]
    cfg = load_config(
        REPO / "configs" / "atari" / "boxing.yaml",
        [
            *short,
            f"run_dir={tmp_path / 'runs'}",
            "model.latent_dim=16",
            "model.hidden_dim=32",
            "model.inject_dim=32",
            "model.mlp_dim=32",
            "model.cnn_channels=4",
            "train.batch_size=4",
            "agent.hidden_dim=32",
            "agent.total_steps=180",
            "agent.seed_steps=120",
            "agent.updates_per_step=0.05",
            "agent.eval_every=1000",
            "agent.eval_episodes=1",
        ],
    )
    run(cfg, progress=False)
    args = ["--games", "boxing", "--runs", str(tmp_path / "runs"), "--episodes", "2", "--held-out", "1"]
    args += ["--held-out-steps", "30", "--planner", "--planner-episodes", "1", "--out", str(tmp_path)]
    payload = load_script().main([*args, "--override", *short])
    saved = json.loads((tmp_path / "atari.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    (game,) = saved["games"]
    assert game["game"] == "Boxing" and game["status"] == "partial" and game["agent_steps"] == 180
    assert len(game["returns"]) == len(game["random_returns"]) == 2
    assert game["hns"] == pytest.approx((game["score"]["mean"] - 0.1) / 12.0)
    assert game["reference"] == {"random": 0.1, "human": 12.1, "dreamerv3": 79.4}
    assert game["elapsed_s"] > 0 and game["peak_rss_mib"] > 0 and game["replay_mib"] > 0
    frame = game["model"]["frame_mse"]
    assert set(frame) == {"1", "10"} and all(0 <= v <= 1 for h in frame.values() for v in h.values())
    assert game["model"]["predictions"] == len(range(0, 30 - 10 + 1, 2))
    assert len(game["planner"]["returns"]) == 1 and game["planner"]["ms_per_decision"] > game["ms_per_decision"]
    md = (tmp_path / "atari.md").read_text()
    assert "| Boxing | 180 |" in md and "Not run yet" not in md and "Actor against the latent planner" in md
