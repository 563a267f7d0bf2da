"""benchmarks/atari.py on a real ALE game with a tiny run: every field of the report is filled and consistent."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loopwm.app.run import run
from loopwm.checkpoint import load_run
from loopwm.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their shared helpers as `common`


def load_benchmark(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script():
    return load_benchmark("atari_benchmark", "atari.py")


def load_pixel_loss():
    return load_benchmark("atari_pixel_loss", "atari_pixel_loss.py")


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
    elapsed = load_run(tmp_path / "runs" / "boxing").payload["progress"]["elapsed_s"]
    args = ["--games", "boxing", "--runs", str(tmp_path / "runs"), "--episodes", "2", "--held-out", "1"]
    args += ["--held-out-steps", "30", "--planner", "--planner-episodes", "1", "--out", str(tmp_path)]
    args += ["--paused", f"boxing={elapsed / 4}"]
    payload = load_script().main([*args, "--override", *short])
    saved = json.loads((tmp_path / "atari.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    (game,) = saved["games"]
    assert game["game"] == "Boxing" and game["status"] == "partial" and game["agent_steps"] == 180
    assert len(game["returns"]) == len(game["random_returns"]) == 2
    assert game["hns"] == pytest.approx((game["score"]["mean"] - 0.1) / 12.0)
    assert game["reference"] == {"random": 0.1, "human": 12.1, "dreamerv3": 79.4}
    assert game["elapsed_s"] == elapsed and game["peak_rss_mib"] > 0 and game["replay_mib"] > 0
    assert game["steps_per_s"] == pytest.approx(180 / (0.75 * elapsed))  # net of the time it was suspended
    assert game["hours_per_100k"] == pytest.approx(0.75 * elapsed / 3600 * 100_000 / 180)
    frame = game["model"]["frame_mse"]
    assert set(frame) == {"1", "10"} and all(0 <= v <= 1 for h in frame.values() for v in h.values())
    assert game["model"]["predictions"] == len(range(0, 30 - 10 + 1, 2))
    assert len(game["planner"]["returns"]) == 1 and game["planner"]["ms_per_decision"] > game["ms_per_decision"]
    md = (tmp_path / "atari.md").read_text()
    assert "| Boxing | 180 | 2 |" in md and "Not run yet" not in md and "Actor against the latent planner" in md
    assert f"net of the time a run was suspended: Boxing {elapsed / 4:.0f} s of {elapsed:.0f} s" in md
    assert game["command"] == saved["machine"]["command"] and f"- Boxing: `{game['command']}`" in md

    # a later invocation for another game, and one whose Boxing run folder is gone, keep the Boxing result; a report
    # from before per-game commands lends its one command to its games
    del saved["games"][0]["command"]
    saved["machine"]["command"] = "the earlier command"
    (tmp_path / "atari.json").write_text(json.dumps(saved))
    later = load_script().main(["--games", "breakout", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert [g["game"] for g in later["games"]] == ["Boxing", "Breakout"]
    assert later["games"][0] == {**game, "command": "the earlier command"}
    md = (tmp_path / "atari.md").read_text()
    assert "Not run yet: Breakout." in md and "- Boxing: `the earlier command`" in md
    gone = load_script().main(["--games", "boxing", "--runs", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert gone["games"] == later["games"]  # Breakout's "not run" stays listed, as this invocation does not name it
    longer = ["--games", "boxing", "--runs", str(tmp_path / "runs"), "--paused", f"boxing={2 * elapsed}"]
    with pytest.raises(SystemExit, match="--paused boxing=.* must be shorter"):  # than the run's whole time
        load_script().main([*longer, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_kept_games_yield_to_a_fresh_measurement_and_to_a_game_named_again(tmp_path):
    script = load_script()
    earlier = {
        "machine": {"command": "old"},
        "games": [
            {"game": "Boxing", "status": "complete"},
            {"game": "Breakout", "status": "partial", "command": "b"},
            {"game": "Pong", "status": "not run"},
        ],
    }
    (tmp_path / "atari.json").write_text(json.dumps(earlier))
    fresh = script.kept_games(tmp_path / "atari.json", [{"game": "Boxing", "status": "complete"}])
    assert fresh == [{"game": "Breakout", "status": "partial", "command": "b"}, {"game": "Pong", "status": "not run"}]
    lost = script.kept_games(tmp_path / "atari.json", [{"game": g, "status": "not run"} for g in ("Boxing", "Pong")])
    assert lost == [{"game": "Boxing", "status": "complete", "command": "old"}, earlier["games"][1]]
    assert script.kept_games(tmp_path / "missing.json", []) == []


def test_atari_benchmark_refuses_held_out_episodes_shorter_than_the_horizon(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--games", "boxing", "--held-out-steps", "9", "--runs", str(tmp_path), "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
    short = two_reward_episode(256)
    short = {"obs": short["obs"][:10], "actions": short["actions"][:9], "rewards": short["rewards"][:9]}
    with pytest.raises(ValueError, match=r"\[9\] steps\) is shorter than the 10-step horizon"):
        script.model_errors(CopyLastModel(), [short], horizon=10)
    assert script.model_errors(CopyLastModel(), [short, two_reward_episode(256)], horizon=10)["predictions"] == 11


@pytest.mark.parametrize("paused", ["pong=10", "boxing=-1", "boxing=abc", "boxing"])
def test_atari_benchmark_refuses_a_pause_of_a_game_it_does_not_measure_or_not_a_time(tmp_path, paused, capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--games", "boxing", "--paused", paused, "--runs", str(tmp_path), "--out", str(tmp_path)])
    assert f"--paused {paused!r}" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


class CopyLastModel:
    """A stand-in world model that predicts every future stack to be the start stack, and zero rewards."""

    def eval(self):
        return self

    def encode(self, obs):
        return obs.float()

    def imagine(self, z, actions, decode):
        from types import SimpleNamespace

        import torch

        assert decode == "all"
        horizon = actions.shape[0]
        return SimpleNamespace(obs=z.expand(horizon, *z.shape), rewards=torch.zeros(horizon, z.shape[0]))

    def reward_head(self, z):
        import torch

        return torch.zeros(z.shape[0])


def two_reward_episode(pixel_max: int) -> dict:
    """30 steps of random frames (pixels below `pixel_max`) and actions, with rewards +1 at step 4 and −1 at 18."""
    import numpy as np

    rng = np.random.default_rng(0)
    obs = rng.integers(0, pixel_max, (31, 4, 36, 36), dtype=np.uint8)
    rewards = np.zeros(30, np.float32)
    rewards[[4, 18]] = [1.0, -1.0]
    return {"obs": obs, "actions": np.eye(3, dtype=np.float32)[rng.integers(3, size=30)], "rewards": rewards}


def test_model_errors_score_a_copy_last_model_exactly_like_the_copy_last_baseline():
    script = load_script()
    out = script.model_errors(CopyLastModel(), [two_reward_episode(256)], horizon=10)
    for h in ("1", "10"):
        assert out["frame_mse"][h]["model"] == pytest.approx(out["frame_mse"][h]["copy_last"], rel=1e-6)
        assert 0.1 < out["frame_mse"][h]["model"] < 0.25  # uniform random pixels: E(x − y)² = 1/6 on a 0-1 scale
    starts = len(range(0, 30 - 10 + 1, 2))
    assert out["predictions"] == starts and out["reward_sign_accuracy_zero"] == 1.0
    assert out["reward_sign_accuracy_nonzero"] == 0.0 and out["nonzero_rewards"] == 2
    assert out["reward_event_auroc"] == 0.5  # a constant prediction ranks nothing


class FlaggedRewardModel(CopyLastModel):
    """Predicts a 1-step reward of magnitude pixel[0, 0, 0] / 255 of the start stack, and reads pixel[1, 0, 0] / 255
    of an encoded stack as its reward."""

    def imagine(self, z, actions, decode):
        out = super().imagine(z, actions, decode)
        out.rewards[0] = z[:, 0, 0, 0] / 255.0
        return out

    def reward_head(self, z):
        return z[:, 1, 0, 0] / 255.0


def test_the_reward_event_auroc_is_one_for_a_head_that_ranks_reward_steps_first():
    script = load_script()
    episode = two_reward_episode(100)
    episode["obs"][[4, 18], 0, 0, 0] = 120  # below 0.5 after scaling, so every prediction still rounds to no reward
    episode["obs"][[5, 19], 1, 0, 0] = 120  # the frames the rewarded steps lead to: what the encoded head reads
    out = script.model_errors(FlaggedRewardModel(), [episode], horizon=10)
    assert out["reward_sign_accuracy_nonzero"] == 0.0 and out["reward_event_auroc"] == 1.0
    assert out["reward_event_auroc_encoded"] == 1.0


def test_pixel_loss_benchmark_smoke_reports_every_weight_and_point(tmp_path):
    pytest.importorskip("ale_py", reason="the [atari] extra")
    script = load_pixel_loss()
    argv = ["--smoke", "--weights", "1", "100", "--define", "r5=train.w_reward=5 train.w_obs=100"]
    payload = script.main([*argv, "--data", str(tmp_path), "--out", str(tmp_path), "--name", "balance"])
    assert json.loads((tmp_path / "balance.json").read_text()) == json.loads(json.dumps(payload))
    assert (tmp_path / "balance.md").exists() and not (tmp_path / "atari_pixel_loss.json").exists()
    assert [fit["variant"] for fit in payload["runs"]] == ["w_obs=1", "w_obs=100", "r5"]
    assert [(fit["w_obs"], fit["w_reward"]) for fit in payload["runs"]] == [(1.0, 1.0), (100.0, 1.0), (100.0, 5.0)]
    for fit in payload["runs"]:
        assert [p["updates"] for p in fit["curve"]] == [2, 4]
        for point in fit["curve"]:
            assert 0 <= point["latent_spread"] < 2
            assert set(point["frame_mse"]) == {"1", "10"} and point["predictions"] > 0
            assert set(point["losses"]) == set(script.TERMS) and point["losses"]["loss/obs"] > 0
    # every variant trained on the same data and scored on the same frames: the copy-last baseline is identical
    assert len({fit["curve"][-1]["frame_mse"]["1"]["copy_last"] for fit in payload["runs"]}) == 1


@pytest.mark.parametrize(
    "defines, message",
    [
        (["r5"], "expected NAME="),
        (["r5=train.w_reward=5", "r5=train.w_reward=6"], "already defined"),
        (["bad=train.nope=1"], "nope"),
    ],
)
def test_pixel_loss_benchmark_rejects_a_bad_variant_before_collecting_data(tmp_path, defines, message):
    script = load_pixel_loss()
    with pytest.raises((SystemExit, ValueError), match=message):
        argv = ["--smoke", "--weights", "1", *[arg for d in defines for arg in ("--define", d)]]
        script.main([*argv, "--data", str(tmp_path), "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_pixel_loss_benchmark_rejects_an_output_name_with_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="file stem"):
        load_pixel_loss().main(["--smoke", "--data", str(tmp_path), "--out", str(tmp_path), "--name", "sub/run"])
    assert list(tmp_path.iterdir()) == []


def write_run(folder: Path, agent: dict, episodes: list[tuple[int, float]], entropies: tuple = ()) -> Path:
    """A run folder with a config.yaml, training-episode rows and actor entropies, as `loopwm run` writes them."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps({"name": folder.name, "seed": 0, "agent": agent}))
    rows = [{"step": 0, "eval/return_mean": -20.0, "eval/return_std": 1.0, "perf/elapsed_s": 5.0}]
    rows += [{"step": s, "episode/return": r} for s, r in episodes]
    rows += [{"step": s, "prior/prior_entropy": h} for s, h in entropies]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')  # torn tail
    return folder


def test_training_returns_compares_runs_window_by_window(tmp_path):
    script = load_benchmark("training_returns", "training_returns.py")
    episodes, entropies = [(900, -21.0), (1000, -19.0), (1500, -20.0)], [(500, 1.0), (700, 2.0), (1200, 0.5)]
    old = write_run(tmp_path / "a" / "pong", {"prior_horizon": 5}, episodes, entropies)
    new = write_run(tmp_path / "b" / "pong", {"prior_horizon": 15, "prior_gradient": "reinforce"}, [(800, -15.0)])
    out = script.main(["--run", f"old={old}", "--run", f"new={new}", "--window", "1000", "--total", "2000",
                       "--out", str(tmp_path / "out"), "--name", "t"])  # fmt: skip
    first, second = out["runs"]["old"]["windows"]
    assert (first["episodes"], first["mean"], first["complete"]) == (2, -20.0, True)  # step 1000 ends window one
    assert (second["episodes"], second["mean"], second["se"]) == (1, -20.0, None)
    assert first["scalars"]["prior/prior_entropy"] == 1.5 and second["scalars"]["prior/prior_entropy"] == 0.5
    assert out["runs"]["new"]["windows"][0]["scalars"] == {"prior/prior_entropy": None, "prior/prior_grad_norm": None}
    assert not out["runs"]["new"]["windows"][0]["complete"] and out["runs"]["new"]["windows"][1]["mean"] is None
    assert out["config_differences"] == {
        "agent.prior_gradient": {"old": None, "new": "reinforce"},
        "agent.prior_horizon": {"old": 5, "new": 15},
    }
    md = (tmp_path / "out" / "t.md").read_text()
    assert "-20.0 ± 1.0 (2)" in md and "-15.0 (1, so far)" in md and "(absent)" in md
    with pytest.raises(SystemExit):  # two runs under one label would silently become one
        script.main(["--run", f"old={old}", "--run", f"old={new}", "--out", str(tmp_path / "out")])
    alone = script.main(["--run", f"old={old}", "--window", "1000", "--total", "2000", "--out", str(tmp_path / "out")])
    assert alone["runs"]["old"]["windows"] == out["runs"]["old"]["windows"] and alone["config_differences"] == {}
