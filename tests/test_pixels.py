"""Pixel observations go through the same training and evaluation path as vectors."""

import gymnasium as gym
import numpy as np
import torch

from loopwm.analysis.prediction import prediction_errors
from loopwm.config import from_dict
from loopwm.objective import TERMS
from loopwm.replay import ReplayBuffer
from loopwm.train import Trainer
from loopwm.world_model import WorldModel


def moving_square_episodes(buffer, episodes=4, length=12, seed=0):
    """A bright square that moves one pixel per step along a random direction: learnable dynamics."""
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        frames = np.zeros((length + 1, 40, 40), np.uint8)
        x, y, dx, dy = *rng.integers(12, 16, 2), *rng.choice([-1, 1], 2)
        for t in range(length + 1):
            frames[t, y + dy * t : y + dy * t + 4, x + dx * t : x + dx * t + 4] = 255
        # stacks as FrameStackObservation builds them: the reset frame repeats before the episode starts
        stacks = np.stack([frames[np.clip(np.arange(t - 3, t + 1), 0, None)] for t in range(length + 1)])
        actions = np.eye(2, dtype=np.float32)[rng.integers(2, size=length)]
        buffer.add_episode(
            stacks,
            actions,
            np.zeros(length, np.float32),
            np.zeros(length, bool),
            np.eye(1, length, length - 1, dtype=bool)[0],
        )


def test_pixel_model_trains_and_evaluates():
    obs_space = gym.spaces.Box(0, 255, (4, 40, 40), np.uint8)
    cfg = from_dict(
        {
            "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64},
            "train": {"batch_size": 8, "horizon": 3, "lr": 3e-3},
        }
    )
    wm = WorldModel.from_config(cfg, obs_space, gym.spaces.Discrete(2))
    buffer = ReplayBuffer((4, 40, 40), 2, 10_000, np.uint8, frame_stack=4)
    moving_square_episodes(buffer)
    trainer = Trainer(wm, cfg, buffer)
    first = [trainer.update() for _ in range(3)]
    for _ in range(40):
        last = trainer.update()
    assert all(np.isfinite(last[f"loss/{k}"]) for k in TERMS)
    assert last["loss/obs"] < np.mean([f["loss/obs"] for f in first])
    result = prediction_errors(wm, buffer, horizons=(1, 5), sequences=8)
    for h in ("1", "5"):
        row = result["horizons"][h]
        assert 0.5 < row["predict_mean"] < 2.0  # frames normalised by the variance over all pixels
        assert np.isfinite(row["model"])
    with torch.no_grad():
        frames = wm.decode(wm.encode(buffer.sample(2, 1, np.random.default_rng(0))["obs"][0]))
    assert frames.shape == (2, 4, 40, 40)
