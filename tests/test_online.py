"""The online loop learns a tiny seeded task, beats a random policy, and resumes exactly."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from loopwm.agents.online import Agent, evaluate, run
from loopwm.config import from_dict


class PointMass(gym.Env):
    """x' = x + 0.2·a on a line; reward −|x − 0.5|; 20 steps. Random play scores about −16."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = float(self.np_random.uniform(-1, 1)), 0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.2 * float(np.asarray(action).reshape(-1)[0]), -2, 2))
        self.t += 1
        return np.array([self.x], np.float32), -abs(self.x - 0.5), False, self.t >= 20, {}


gym.register("PointMass-v0", entry_point=PointMass)


def tiny(tmp_path, **agent):
    base = {
        "name": "pm", "run_dir": str(tmp_path), "seed": 0,
        "env": {"id": "PointMass-v0"},
        "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "loops": 2},
        "train": {"batch_size": 32, "horizon": 3, "loop_mean": 2, "bptt_loops": 2, "checkpoint_every": 20,
                  "log_every": 20},
        "planner": {"horizon": 3, "iterations": 3, "samples": 64, "elites": 8, "policy_samples": 4},
        "agent": {"total_steps": 300, "seed_steps": 100, "updates_per_step": 0.5, "eval_every": 1000,
                  "eval_episodes": 5},
    }
    base["agent"].update(agent)
    return from_dict(base)


def random_return(episodes=5, seed=10_000):
    env, rng, total = PointMass(), np.random.default_rng(0), []
    for i in range(episodes):
        env.reset(seed=seed + i)
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(rng.uniform(-1, 1, 1))
            ret, done = ret + r, term or trunc
        total.append(ret)
    return float(np.mean(total))


def test_agent_beats_random_on_a_tiny_task(tmp_path):
    summary = run(tiny(tmp_path), progress=False)
    final = summary["curve"][-1]
    assert final[0] == 300
    baseline = random_return()
    assert final[1] > baseline + 5.0, (final, baseline)
    assert (tmp_path / "pm" / "checkpoints" / "latest.pt").exists()
    assert (tmp_path / "pm" / "summary.json").exists()


def params(agent_path):
    from loopwm.checkpoint import read_checkpoint

    payload = read_checkpoint(agent_path)
    return payload["model"], payload["agent"]["value"]["net"], payload["agent"]["prior"]["net"]


def test_run_resumes_after_interruption(tmp_path):
    straight = tiny(tmp_path / "a", total_steps=200)
    run(straight, progress=False)
    first = tiny(tmp_path / "b", total_steps=120)
    run(first, progress=False)
    resumed = tiny(tmp_path / "b", total_steps=200)
    resumed.resume = True
    run(resumed, progress=False)
    for a, b in zip(params(tmp_path / "a" / "pm" / "checkpoints" / "latest.pt"),
                    params(tmp_path / "b" / "pm" / "checkpoints" / "latest.pt")):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_evaluation_does_not_perturb_training_randomness(tmp_path):
    cfg = tiny(tmp_path)
    env = PointMass()
    agent = Agent(cfg, env.observation_space, env.action_space)
    gen_state = agent.planner.gen.get_state()
    torch_state = torch.get_rng_state()
    evaluate(agent, 1, seed=0)
    assert torch.equal(agent.planner.gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_refuses_to_overwrite_a_run(tmp_path):
    from loopwm.config import ConfigError

    cfg = tiny(tmp_path, total_steps=40, seed_steps=40)
    run(cfg, progress=False)
    with pytest.raises(ConfigError, match="resume=true"):
        run(cfg, progress=False)
