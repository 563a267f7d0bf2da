"""The policy protocol: one function plays a policy in the real env and in the model, returns side by side."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopwm.envs import WorldModelEnv, episode_returns, value_gap
from loopwm.loop_state import LoopTrace
from loopwm.world_model import WorldModel
from tests.helpers import tiny_config

GAIN = np.float32(0.2)


class PointMass(gym.Env):
    """x' = clip(x + 0.2·a, −2, 2), reward −|x' − 0.5|, 20 steps; float32 arithmetic throughout."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = np.float32(self.np_random.uniform(-1, 1)), 0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = np.clip(self.x + GAIN * np.float32(np.asarray(action)[0]), np.float32(-2), np.float32(2))
        self.t += 1
        return np.array([self.x], np.float32), float(-np.abs(self.x - np.float32(0.5))), False, self.t >= 20, {}


class AnalyticModel(WorldModel):
    """A 'world model' whose latent is the state and whose step is the true dynamics, exactly."""

    def __init__(self, gain=GAIN):
        real = PointMass()
        model = WorldModel.from_config(tiny_config(), real.observation_space, real.action_space)
        super().__init__(model.cfg, model.spec)
        self.gain = float(gain)

    def encode(self, obs):
        return torch.as_tensor(obs, dtype=torch.float32).reshape(-1, 1)

    def step(self, z, action, obs=None, **loop):
        batch = z.shape[0]
        z = torch.clamp(z + torch.tensor(self.gain, dtype=torch.float32) * torch.as_tensor(action), -2.0, 2.0)
        return z, LoopTrace(
            torch.zeros(1, batch),
            torch.ones(batch, dtype=torch.long),
            torch.zeros(batch),
            torch.ones(batch, dtype=torch.bool),
            0.0,
        )

    def predict_reward(self, z):
        return -torch.abs(z[:, 0] - 0.5)

    def predict_continue(self, z):
        return torch.ones(z.shape[0])

    def decode(self, z):
        return z


def controller(obs):
    """Drive towards x = 0.5, saturating."""
    return np.clip(np.float32(4.0) * (np.float32(0.5) - obs), -1, 1).astype(np.float32)


def model_env(wm):
    return WorldModelEnv(wm, observation_space=PointMass.observation_space, max_episode_steps=20)


def test_exact_dynamics_give_identical_returns():
    gap = value_gap(controller, PointMass(), model_env(AnalyticModel()), episodes=4, seed=3)
    assert gap.real == gap.model and gap.gap == 0.0
    assert gap.real_steps == gap.model_steps == [20] * 4
    assert len(set(gap.real)) == 4  # four different starts, each replayed in the model
    assert gap.real == episode_returns(controller, PointMass(), 4, seed=3)
    random_policy = np.random.default_rng(0)
    noisy = value_gap(
        lambda obs: random_policy.uniform(-1, 1, 1).astype(np.float32),
        PointMass(),
        model_env(AnalyticModel()),
        episodes=2,
    )
    assert noisy.real != noisy.model  # a stochastic policy draws different actions in the two plays


def test_a_wrong_model_shows_a_gap_with_the_right_sign():
    gap = value_gap(controller, PointMass(), model_env(AnalyticModel(gain=0.4)), episodes=4, seed=3)
    assert gap.model_mean > gap.real_mean  # faster dynamics reach the target sooner: the model flatters
    assert gap.gap == pytest.approx(gap.model_mean - gap.real_mean)
    summary = gap.summary()
    assert summary["gap"] == gap.gap and summary["real"] == gap.real


def test_policies_with_reset_are_reset_each_episode_and_bad_input_is_refused():
    class Counting:
        resets = 0

        def reset(self):
            self.resets += 1

        def __call__(self, obs):
            return controller(obs)

    policy = Counting()
    value_gap(policy, PointMass(), model_env(AnalyticModel()), episodes=3)
    assert policy.resets == 6
    with pytest.raises(TypeError, match="policy must be callable"):
        episode_returns(object(), PointMass(), 1)
    with pytest.raises(ValueError, match="episodes must be an integer >= 1"):
        value_gap(controller, PointMass(), model_env(AnalyticModel()), episodes=0)


class FallsOver(PointMass):
    """PointMass that terminates once x leaves [-1.1, 1.1]: a model that never terminates misses it."""

    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        return obs, reward, bool(abs(self.x) > 1.1), truncated, info


def test_model_episodes_end_where_the_real_time_limit_does_and_run_on_past_a_missed_termination():
    long_model = WorldModelEnv(AnalyticModel(), observation_space=PointMass.observation_space, max_episode_steps=50)
    gap = value_gap(controller, PointMass(), long_model, episodes=2)
    assert gap.real_steps == gap.model_steps == [20, 20]  # cut at the real 20-step limit, not the model's 50
    assert gap.real == gap.model
    away = value_gap(lambda obs: np.ones(1, np.float32), FallsOver(), long_model, episodes=2)
    assert all(r < 20 for r in away.real_steps) and away.model_steps == [50, 50]  # the model never terminates
    unbounded = WorldModelEnv(AnalyticModel(), observation_space=PointMass.observation_space, max_episode_steps=None)
    with pytest.raises(ValueError, match="model_env has no time limit"):
        value_gap(controller, PointMass(), unbounded, episodes=1)
    limited = gym.wrappers.TimeLimit(unbounded, 20)
    assert value_gap(controller, PointMass(), limited, episodes=1).model_steps == [20]
