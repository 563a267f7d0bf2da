"""Small builders shared by the tests."""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from loopwm.config import Config, from_dict
from loopwm.world_model import WorldModel


def tiny_config(**model) -> Config:
    """A config whose model is small enough for second-long tests."""
    base = {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64}
    base.update(model)
    return from_dict({"model": base})


def box_spaces(obs_dim: int = 3, act_dim: int = 1) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    return (gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
            gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32))


def tiny_model(**model) -> WorldModel:
    return WorldModel.from_config(tiny_config(**model), *box_spaces())
