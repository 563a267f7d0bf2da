"""loopwm.load_agent: a saved run's model, planner, value and prior, acting in the environment's own units."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import loopwm
from loopwm.agents import PlanningAgent
from tests.helpers import save_pendulum_run


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "latest.pt"
    return path, save_pendulum_run(path)


def test_load_agent_carries_model_value_and_prior(run_checkpoint):
    path, saved = run_checkpoint
    agent = loopwm.load_agent(path)
    assert isinstance(agent, PlanningAgent)
    for a, b in [(agent.wm, saved.wm), (agent.value.net, saved.value.net), (agent.prior.net, saved.prior.net)]:
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y)
    assert agent.planner.value is agent.value and agent.planner.prior is agent.prior
    assert agent.action_space == gym.make("Pendulum-v1").action_space


def test_actions_are_in_pendulums_own_units(run_checkpoint):
    path, _ = run_checkpoint
    env = gym.make("Pendulum-v1")
    agent, twin = loopwm.load_agent(path, seed=5), loopwm.load_agent(path, seed=5)
    obs, _ = env.reset(seed=0)
    agent.reset()
    actions = []
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    for t in range(8):
        action = agent.act(obs)  # every draw from the planner's seeded generator, none from torch's global one
        raw = twin.planner.act(obs, eval_mode=True, t0=t == 0)  # the planner's [-1, 1] action
        np.testing.assert_allclose(action, 2.0 * np.clip(raw, -1, 1), rtol=1e-6)  # scaled onto ±2, not passed on
        assert action in env.action_space and action.dtype == np.float32 and action.shape == (1,)
        actions.append(action)
        obs, *_ = env.step(action)
    assert torch.equal(torch.get_rng_state(), global_state)
    explorer = loopwm.load_agent(path, seed=1, explore=True)
    wide = [explorer.act(env.reset(seed=i)[0]) for i in range(20)]
    assert all(a in env.action_space for a in wide) and max(abs(float(a[0])) for a in wide) > 1.0
    agent.reset()
    assert agent.planner.prev is None


def test_bad_observations_and_mismatched_environments_are_refused(run_checkpoint, tmp_path):
    path, saved = run_checkpoint
    agent = loopwm.load_agent(path)
    with pytest.raises(ValueError, match="observation given to act\\(\\) contains NaN"):
        agent.act(np.array([np.nan, 0.0, 0.0], np.float32))
    with pytest.raises(ValueError, match=r"observation given to act\(\) has shape \(4,\); expected \(3,\)"):
        agent.act(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="environment CartPole-v1 .* has observation space"):
        loopwm.load_agent(path, env="CartPole-v1")
    assert loopwm.load_agent(path, env="Pendulum-v1").action_space == gym.make("Pendulum-v1").action_space
    with pytest.raises(loopwm.CheckpointError, match="does not exist"):
        loopwm.load_agent(tmp_path / "nothing.pt")


def test_a_bare_model_checkpoint_plans_without_value_or_prior(run_checkpoint, tmp_path):
    _, saved = run_checkpoint
    loopwm.save(tmp_path / "wm.pt", saved.wm)
    agent = loopwm.load_agent(tmp_path / "wm.pt")
    assert agent.value is None and agent.prior is None
    action = agent(np.zeros(3, np.float32))  # a policy: callable
    assert action in gym.make("Pendulum-v1").action_space


def test_load_agent_is_exported_lazily():
    import loopwm.agents.planning_agent as module

    assert loopwm.load_agent is module.load_agent and "load_agent" in loopwm.__all__
