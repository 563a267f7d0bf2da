"""Dict observations (frames + vectors) and MultiDiscrete / MultiBinary actions, end to end on toy envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Dict, Discrete, MultiBinary, MultiDiscrete

from loopwm.agents.online import Agent
from loopwm.agents.planner import MPPIPlanner
from loopwm.checkpoint import load, save
from loopwm.config import PlannerConfig, from_dict
from loopwm.envs import action_dim, action_from_model, action_to_model, make_env
from loopwm.nets import DictEncoder, SpaceSpec
from loopwm.world_model import WorldModel

BEST = np.array([2, 0, 1])  # the MultiDiscrete action the toy env pays most for


class DictPointEnv(gym.Env):
    """A point on a line seen as a 1x40x40 frame (a bright column) plus its position and velocity;
    MultiDiscrete([3, 2, 2]) actions, reward 1 for each sub-action that matches BEST."""

    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = Dict(
            {"frame": Box(0, 255, (1, 40, 40), np.uint8), "state": Box(-1.0, 1.0, (2,), np.float32)}
        )
        self.action_space = MultiDiscrete([3, 2, 2])
        self.x, self.t = 0.0, 0

    def _obs(self) -> dict:
        frame = np.zeros((1, 40, 40), np.uint8)
        frame[0, :, int(round((self.x + 1) * 19.5))] = 255
        return {"frame": frame, "state": np.array([self.x, 0.1], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = float(self.np_random.uniform(-1, 1)), 0
        return self._obs(), {}

    def step(self, action):
        action = np.asarray(action)
        self.x = float(np.clip(self.x + 0.2 * (action[0] - 1), -1, 1))
        self.t += 1
        return self._obs(), float((action == BEST).sum()), False, self.t >= 20, {}


gym.register("loopwm-test/DictPoint-v0", entry_point=DictPointEnv)


def tiny(**over):
    base = {
        "env": {"id": "loopwm-test/DictPoint-v0"},
        "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 32, "loops": 2},
        "train": {"batch_size": 8, "horizon": 3, "lr": 3e-3},
        "planner": {"horizon": 2, "iterations": 2, "samples": 32, "elites": 4, "policy_samples": 4},
        "agent": {"hidden_dim": 32, "prior_horizon": 2},
    }
    return from_dict({**base, **over})


def test_dict_env_is_flattened_with_its_layout():
    env = make_env(tiny().env, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (1602,) and obs.dtype == np.float32 and env.observation_space.contains(obs)
    spec = SpaceSpec.from_spaces(env.observation_space, env.action_space)
    assert spec.obs_parts == (("frame", (1, 40, 40), True), ("state", (2,), False))
    assert spec.action_groups == (3, 2, 2) and spec.action_dim == 7 and spec.discrete
    frame = obs[:1600].reshape(40, 40)  # keys in sorted order: the frame's 1600 pixels, then the state
    assert set(np.unique(frame)) == {0.0, 255.0} and (frame == 255).all(0).sum() == 1
    assert obs[1601] == pytest.approx(0.1) and abs(obs[1600]) <= 1


def test_dict_model_encodes_each_key_and_keeps_frames_on_the_pixel_scale(tmp_path):
    env = make_env(tiny().env, seed=0)
    wm = WorldModel.from_config(tiny(), env.observation_space, env.action_space)
    assert isinstance(wm.encoder, DictEncoder) and len(wm.encoder.parts) == 2
    wm.set_obs_stats(torch.full((1602,), 3.0), torch.full((1602,), 2.0))
    assert torch.all(wm.obs_mean[:1600] == 127.5) and torch.all(wm.obs_std[:1600] == 255.0)
    assert torch.all(wm.obs_mean[1600:] == 3.0) and torch.all(wm.obs_std[1600:] == 2.0)
    obs = torch.as_tensor(np.stack([env.reset(seed=s)[0] for s in range(4)]))
    z = wm.encode(obs)
    z1, trace = wm.step(z, torch.tensor([[2, 0, 1]] * 4))  # indices per group
    assert wm.decode(z1).shape == (4, 1602) and trace.loops_used.tolist() == [2] * 4
    save(tmp_path / "wm.pt", wm)
    again = load(tmp_path / "wm.pt")
    assert again.spec == wm.spec
    torch.testing.assert_close(again.encode(obs), z)


@pytest.mark.parametrize(
    "space, env_action, model_action",
    [
        (MultiDiscrete([3, 2], start=[1, -1]), np.array([3, -1]), [0, 0, 1, 1, 0]),
        (MultiBinary(3), np.array([1, 0, 1], np.int8), [0, 1, 1, 0, 0, 1]),
        (Discrete(4, start=2), np.int64(3), [0, 1, 0, 0]),
    ],
)
def test_categorical_actions_round_trip(space, env_action, model_action):
    x = action_to_model(env_action, space)
    assert x.tolist() == model_action and action_dim(space) == len(model_action)
    back = action_from_model(x, space)
    np.testing.assert_array_equal(back, env_action)
    assert space.contains(back)
    batch = action_to_model(np.stack([env_action, env_action]), space)
    assert batch.shape == (2, len(model_action))
    np.testing.assert_array_equal(action_from_model(batch, space), np.stack([env_action, env_action]))


class GroupBandit:
    """Latent-free bandit over MultiDiscrete([3, 2, 2]) one-hots: reward = one-hot · payoff."""

    discrete, action_dim, action_groups, latent_dim = True, 7, (3, 2, 2), 7

    def __init__(self):
        self.payoff = torch.tensor([0.0, 0.2, 1.0, 0.7, 0.0, 0.0, 0.4])  # best: 2, 0, 1

    def encode(self, obs):
        return torch.zeros(obs.shape[0], 7)

    def imagine(self, z, actions, decode="none"):
        from types import SimpleNamespace

        rewards = actions @ self.payoff
        latents = torch.cat([z[None], actions])
        return SimpleNamespace(
            latents=latents,
            rewards=rewards,
            continues=torch.ones_like(rewards),
            bound=torch.zeros_like(rewards),
            converged=torch.ones_like(rewards, dtype=torch.bool),
            loops=torch.ones_like(rewards, dtype=torch.long),
        )


def test_planner_finds_the_best_multidiscrete_action():
    cfg = PlannerConfig(horizon=2, iterations=4, samples=64, elites=8, policy_samples=0)
    planner = MPPIPlanner(GroupBandit(), cfg, seed=0)
    action = planner.act(np.zeros(1), eval_mode=True)
    np.testing.assert_array_equal(action, BEST)
    probs = planner.prev["probs"][0, 0]
    torch.testing.assert_close(probs[:3].sum() + probs[3:5].sum() + probs[5:].sum(), torch.tensor(3.0))
    random_planner = MPPIPlanner(GroupBandit(), cfg, seed=0, exploration=1.0)
    draws = np.stack([random_planner.act(np.zeros(1)) for _ in range(30)])
    assert draws.shape == (30, 3) and np.all(draws < np.array([3, 2, 2])) and len({tuple(d) for d in draws}) > 3


def test_agent_trains_and_plans_on_dict_obs_and_multidiscrete_actions():
    cfg = tiny()
    env = make_env(cfg.env, seed=0)
    agent = Agent(cfg, env.observation_space, env.action_space)
    obs, _ = env.reset(seed=0)
    for _ in range(60):
        action = agent.random_actions(1)[0]
        assert action.shape == (7,) and action.sum() == 3
        next_obs, reward, terminated, truncated, _ = env.step(action_from_model(action, env.action_space))
        agent.replay.add(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
    stats = agent.replay.stats()
    agent.wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    losses = [agent.update()["loss/total"] for _ in range(4)]
    assert all(np.isfinite(losses))
    planned = agent.planned_action(obs, eval_mode=True, t0=True)
    assert planned.shape == (7,) and planned.sum() == 3
    assert env.action_space.contains(action_from_model(planned, env.action_space))


def test_a_categorical_start_survives_the_checkpoint_and_shapes_every_rebuilt_action_space(tmp_path):
    import loopwm
    from loopwm.envs import WorldModelEnv
    from tests.helpers import tiny_config

    obs_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    for act_space in (gym.spaces.Discrete(3, start=-1), gym.spaces.MultiDiscrete([3, 2], start=[-1, 5])):
        path = tmp_path / "model.pt"
        loopwm.save(path, WorldModel.from_config(tiny_config(), obs_space, act_space))
        agent = loopwm.load_agent(path)  # no env given: the action space comes from the checkpoint alone
        assert agent.action_space == act_space
        obs = np.zeros(4, np.float32)
        assert agent.act(obs) in act_space
        env = WorldModelEnv(loopwm.load(path), reset_obs=obs[None])
        assert env.action_space == act_space
        shifted = (
            gym.spaces.Discrete(3) if isinstance(act_space, gym.spaces.Discrete) else gym.spaces.MultiDiscrete([3, 2])
        )
        with pytest.raises(ValueError, match="starting at"):
            WorldModelEnv(loopwm.load(path), reset_obs=obs[None], action_space=shifted)
