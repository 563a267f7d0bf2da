"""`loopwm eval RUN --video DIR`: the real episodes as MP4, and the model's open-loop imagination next to
the real frames (a GIF for frames, a PNG for vectors), checked against an independent replay."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from gymnasium.spaces import Box, Discrete
from PIL import Image

import loopwm
from loopwm.app.evaluate import saved_agent
from loopwm.app.video import BAR, SCALE, SEPARATOR, open_loop, require_writers
from loopwm.cli import main
from loopwm.config import ConfigError
from loopwm.envs import action_to_model
from loopwm.nets import SpaceSpec
from tests.helpers import save_pendulum_run

SQUARE = "loopwm-test/MovingSquare-v0"
SIZE = 36  # the smallest frame the CNN encoder takes
MOVES = np.array([[-2, 0], [2, 0], [0, -2], [0, 2]])  # up, down, left, right (rows, columns)


class MovingSquare(gym.Env):
    """A 4x4 square on a 36x36 screen that each action moves 2 pixels; a reward of 1 while it touches an edge.
    Observations stack the last two frames (newest last), as Atari frame stacks do; render shows the newest."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = Box(0, 255, (2, SIZE, SIZE), np.uint8)
        self.action_space = Discrete(4)

    def _frame(self) -> np.ndarray:
        frame = np.full((SIZE, SIZE), 20, np.uint8)
        (r, c) = self.pos
        frame[r : r + 4, c : c + 4] = 230
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.integers(8, SIZE - 12, 2)
        self.frames = [self._frame()] * 2
        return np.stack(self.frames), {}

    def step(self, action):
        self.pos = np.clip(self.pos + MOVES[int(action)], 0, SIZE - 4)
        self.frames = [self.frames[-1], self._frame()]
        reward = float(np.any(self.pos == 0) or np.any(self.pos == SIZE - 4))
        return np.stack(self.frames), reward, False, False, {}

    def render(self):
        return np.repeat(self.frames[-1][..., None], 3, axis=-1)


if SQUARE not in gym.registry:
    gym.register(SQUARE, entry_point=MovingSquare, max_episode_steps=60)

TINY_RUN = {
    "device": "cpu",
    "threads": 1,
    "env": {"id": SQUARE},
    "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 32, "loops": 2, "cnn_channels": 4},
    "train": {"batch_size": 4, "horizon": 3, "loop_mean": 2, "bptt_loops": 2, "log_every": 10},
    "data": {"capacity": 1000},
    "planner": {"method": "policy"},
    "agent": {"total_steps": 120, "seed_steps": 60, "updates_per_step": 0.05, "eval_every": 1000},
}


@pytest.fixture(scope="module")
def square_run(tmp_path_factory) -> Path:
    """A `loopwm run` of a few updates on the moving square: a pixel world model, value, actor and planner."""
    root = tmp_path_factory.mktemp("square")
    config = root / "square.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "agent": {**TINY_RUN["agent"], "eval_episodes": 1}}))
    assert main(["run", "-q", str(config), "name=sq", f"run_dir={root / 'runs'}"]) == 0
    return root / "runs" / "sq"


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.array(gif.convert("L")))
    return frames


def replay(run: Path, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Newest real frames [T, H, W] of the saved agent's play from reset(seed), and the model's open-loop
    imagination of them [T, H, W] (floats in [0, 255]), computed here independently of `loopwm eval`."""
    agent = loopwm.load_agent(run)
    env = gym.make(SQUARE)
    obs, _ = env.reset(seed=seed)
    start, real, actions = obs, [], []
    for _ in range(steps):
        actions.append(agent.act(obs))
        obs, *_ = env.step(actions[-1])
        real.append(obs[-1])
    wm = agent.wm
    model_actions = torch.as_tensor(action_to_model(np.array(actions), env.action_space))[:, None]
    with torch.no_grad():
        imagined = wm.imagine(wm.encode(torch.as_tensor(start[None])), model_actions, decode="all").obs
    return np.stack(real), imagined[:, 0, -1].numpy()


def test_video_records_the_episode_and_a_side_by_side_that_matches_the_real_game(square_run, tmp_path, capsys):
    out = tmp_path / "video"
    assert main(["eval", str(square_run), "--video", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    mp4, gif = out / "rl-video-episode-0.mp4", out / "imagined.gif"
    assert f"wrote {mp4}" in printed and f"wrote {gif}" in printed and "for 50 steps" in printed
    assert sorted(p.name for p in out.iterdir()) == ["imagined.gif", "rl-video-episode-0.mp4"]
    assert mp4.stat().st_size > 0 and gif.stat().st_size < 2**20
    frames = gif_frames(gif)
    assert len(frames) == 50
    panel = SCALE * SIZE
    assert frames[0].shape == (panel + BAR, 3 * panel + 2 * SEPARATOR)
    real, imagined = replay(square_run, seed=3, steps=50)
    assert len({r.tobytes() for r in real}) > 5  # the square moved (to an edge, where the reward is)
    rollout = open_loop(saved_agent(square_run), 50, seed=3)  # what the GIF was drawn from, before rounding
    np.testing.assert_array_equal(rollout.real[1:, -1], real)
    np.testing.assert_allclose(rollout.imagined[:, -1], imagined, rtol=0, atol=1e-4)  # from the real start
    imagined = np.clip(np.rint(imagined), 0, 255)
    for k, frame in enumerate(frames):
        panels = [frame[:panel, i * (panel + SEPARATOR) :][:panel, :panel] for i in range(3)]
        assert all((p[::SCALE, ::SCALE].repeat(SCALE, 0).repeat(SCALE, 1) == p).all() for p in panels)  # ×2 nearest
        shown = [p[::SCALE, ::SCALE].astype(int) for p in panels]
        np.testing.assert_array_equal(shown[0], real[k])  # step k's real frame, exactly
        assert np.abs(shown[1] - imagined[k]).max() <= 1  # the model's frame from the real start, open loop
        assert np.abs(shown[2] - np.abs(real[k].astype(int) - imagined[k])).max() <= 1
        assert (frame[:panel, panel : panel + SEPARATOR] == 255).all()
        assert (frame[panel:, : 3 * panel * (k + 1) // 50] == 255).all()  # the horizon bar fills step by step


def test_video_records_each_episode_and_stops_imagining_where_the_episode_ends(square_run, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["eval", str(square_run), "--video", str(out), "--episodes", "2", "--imagine-steps", "70"]) == 0
    printed = capsys.readouterr().out
    assert "over 2 episodes" in printed and "for 60 steps (the episode ended after 60 of 70)" in printed
    assert (out / "rl-video-episode-0.mp4").is_file() and (out / "rl-video-episode-1.mp4").is_file()
    assert len(gif_frames(out / "imagined.gif")) == 60  # the env's time limit


def test_vector_observations_get_a_plot_per_dimension(tmp_path, capsys):
    pytest.importorskip("pygame", reason="Pendulum renders with pygame (the [video] extra)")
    save_pendulum_run(tmp_path / "pend.pt", max_episode_steps=30)
    out = tmp_path / "v"
    args = ["eval", str(tmp_path / "pend.pt"), "--video", str(out), "--imagine-steps", "20", "--seed", "0"]
    assert main(args) == 0
    assert "imagined.png: real vs imagined, open loop for 20 steps" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["imagined.png", "rl-video-episode-0.mp4"]
    with Image.open(out / "imagined.png") as png:
        assert png.format == "PNG" and png.size == (960, 280)  # Pendulum's 3 dimensions side by side, 100 dpi


def test_video_without_moviepy_names_the_extra_and_writes_nothing(square_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "moviepy", None)  # makes `import moviepy` fail
    assert main(["eval", str(square_run), "--video", str(tmp_path / "v")]) == 2
    assert "pip install 'loopwm[video]'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--video", "v", "--imagine-steps", "0"], "--imagine-steps: expected an integer >= 1"),
        (["--video", "v", "--seed", "-1"], "--seed: expected an integer >= 0"),
        (["--imagine-steps", "5"], "--imagine-steps does not apply here"),
        (["--seed", "5"], "--seed does not apply here"),
        (["--video", "v", "--exit", "fixed"], "--exit does not apply here"),
    ],
)
def test_video_arguments_are_checked_at_the_door(tmp_path, capsys, args, named):
    try:
        code = main(["eval", str(tmp_path / "missing.pt"), *args])
    except SystemExit as exited:  # argparse's own refusals
        code = exited.code
    assert code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_dict_observations_are_refused_before_playing():
    spec = SpaceSpec.from_spaces(gym.spaces.Dict({"x": Box(-1, 1, (2,))}), Discrete(2))
    with pytest.raises(ConfigError, match="not of Dict observations.*--episodes N"):
        require_writers(spec)


def test_a_real_atari_game_records_both_videos(tmp_path, capsys):
    pytest.importorskip("ale_py", reason="the [atari] extra")
    config = Path(__file__).resolve().parents[1] / "configs" / "atari" / "pong.yaml"
    tiny = [
        "device=cpu",
        *(f"model.{k}={v}" for k, v in TINY_RUN["model"].items()),
        "model.exit=fixed",
        "train.batch_size=4",
        "train.horizon=2",
        "train.loop_mean=2",
        "train.bptt_loops=2",
        "data.capacity=500",
        "env.max_episode_steps=60",
        "agent.total_steps=60",
        "agent.seed_steps=30",
        "agent.updates_per_step=0.05",
        "agent.eval_episodes=1",
        "agent.hidden_dim=16",
    ]
    assert main(["run", "-q", str(config), "name=pong", f"run_dir={tmp_path}", *tiny]) == 0
    out = tmp_path / "video"
    assert main(["eval", str(tmp_path / "pong"), "--video", str(out), "--imagine-steps", "20"]) == 0
    assert (out / "rl-video-episode-0.mp4").stat().st_size > 0
    frames = gif_frames(out / "imagined.gif")
    assert len(frames) == 20 and frames[0].shape == (2 * 84 + BAR, 3 * 2 * 84 + 2 * SEPARATOR)
    assert (out / "imagined.gif").stat().st_size < 2 * 2**20
