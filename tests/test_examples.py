"""The examples run end to end at tiny sizes (seconds each)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import save_pendulum_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_MODEL = [
    "model.latent_dim=16",
    "model.hidden_dim=32",
    "model.inject_dim=32",
    "model.mlp_dim=64",
    "train.batch_size=16",
]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sb3_in_model_trains_in_imagination_and_evaluates_for_real(tmp_path, capsys):
    pytest.importorskip(
        "stable_baselines3", reason="stable-baselines3 is in the [examples] extra: pip install 'loopwm[examples]'"
    )
    result = load("sb3_in_model").main(
        [
            "--rounds",
            "2",
            "--real-steps",
            "200",
            "--updates",
            "5",
            "--sb3-steps",
            "96",
            "--num-envs",
            "8",
            "--horizon",
            "5",
            "--eval-episodes",
            "2",
            "--out",
            str(tmp_path / "gap.json"),
            *TINY_MODEL,
        ]
    )
    out = capsys.readouterr().out
    assert "round 2: 400 real transitions, 10 model updates, 192 imagined transitions for SAC" in out
    assert len(result["real"]) == len(result["model"]) == 2
    assert result["real_steps"] == [200, 200]  # Pendulum's time limit, in both environments
    assert all(1 <= steps <= 200 for steps in result["model_steps"])  # the model may predict an early end
    assert result["gap"] == pytest.approx(np.mean(result["model"]) - np.mean(result["real"]))
    assert (tmp_path / "gap.json").exists()


def test_plan_from_python_plays_real_episodes(tmp_path, capsys):
    save_pendulum_run(tmp_path / "latest.pt")
    returns = load("plan_from_python").main([str(tmp_path / "latest.pt"), "--episodes", "2"])
    out = capsys.readouterr().out
    assert len(returns) == 2 and all(-2000 < r < 0 for r in returns)  # Pendulum returns are negative
    assert "episode 1: return" in out and "over 200 steps" in out and "mean return" in out
