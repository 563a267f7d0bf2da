"""Small builders shared by the tests."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from loopwm.config import Config, from_dict
from loopwm.world_model import WorldModel

TINY = {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64}
"""Model sizes small enough for second-long tests."""


def tiny_config(**model) -> Config:
    """A config with the `TINY` model (and `model` overrides)."""
    return from_dict({"model": {**TINY, **model}})


def box_spaces(obs_dim: int = 3, act_dim: int = 1) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    return (gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32), gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32))


def tiny_model(**model) -> WorldModel:
    return WorldModel.from_config(tiny_config(**model), *box_spaces())


TINY_PENDULUM_RUN = {
    "env": {"id": "Pendulum-v1"},
    "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "loops": 2},
    "planner": {"horizon": 2, "iterations": 2, "samples": 32, "elites": 4, "policy_samples": 4},
    "agent": {"exploration_std": 0.3},
    "device": "cpu",
}


def save_pendulum_run(path, max_episode_steps=None):
    """A Pendulum run checkpoint (model, config, replay, value and prior) whose value and prior differ from
    freshly built ones, its episodes cut at `max_episode_steps` when given; returns the online `Agent` saved."""
    import torch

    from loopwm.agents.online import Agent
    from loopwm.train import save_run

    real = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    cfg = from_dict({**TINY_PENDULUM_RUN, "env": {"id": "Pendulum-v1", "max_episode_steps": max_episode_steps}})
    agent = Agent(cfg, real.observation_space, real.action_space)
    with torch.no_grad():
        for p in [*agent.value.net.parameters(), *agent.prior.net.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    save_run(path, agent.trainer, agent=agent.state_dict())
    return agent
