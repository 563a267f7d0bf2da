"""The online loop learns a tiny seeded task, beats a random policy, and resumes exactly."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopwm.agents.online import Agent, evaluate
from loopwm.app.run import run
from loopwm.config import from_dict, to_dict


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
        "name": "pm",
        "run_dir": str(tmp_path),
        "seed": 0,
        "env": {"id": "PointMass-v0"},
        "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "loops": 2},
        "train": {
            "batch_size": 32,
            "horizon": 3,
            "loop_mean": 2,
            "bptt_loops": 2,
            "checkpoint_every": 20,
            "log_every": 20,
        },
        "planner": {"horizon": 3, "iterations": 3, "samples": 64, "elites": 8, "policy_samples": 4},
        "agent": {
            "total_steps": 300,
            "seed_steps": 100,
            "updates_per_step": 0.5,
            "eval_every": 1000,
            "eval_episodes": 5,
        },
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


STRAIGHT = {"total_steps": 160, "eval_episodes": 1}
"""The uninterrupted run every interrupted one must end as: 100 random steps, then 60 planned ones."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted `STRAIGHT` run's folder."""
    root = tmp_path_factory.mktemp("straight")
    run(tiny(root, **STRAIGHT), progress=False)
    return root / "pm"


def test_run_resumes_after_interruption(tmp_path, straight):
    first = tiny(tmp_path / "b", total_steps=120, eval_episodes=1)
    run(first, progress=False)
    metrics = tmp_path / "b" / "pm" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a killed run logged after its last checkpoint
        f.write(json.dumps({"step": 130, "episode/return": 12345.0}) + "\n")
    resumed = tiny(tmp_path / "b", **STRAIGHT)
    resumed.resume = True
    run(resumed, progress=False)
    for a, b in zip(
        params(straight / "checkpoints" / "latest.pt"),
        params(tmp_path / "b" / "pm" / "checkpoints" / "latest.pt"),
    ):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert 12345.0 not in [r.get("episode/return") for r in rows]

    def training_rows(rows):  # the interrupted run also evaluated at its last step, 120
        return [(r["step"], sorted(r)) for r in rows if "eval/return_mean" not in r]

    assert training_rows(rows) == training_rows(straight_rows)
    assert [r["step"] for r in rows if "eval/return_mean" in r] == [0, 120, 160]


def test_logger_rewind_purges_what_came_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loopwm.logger import RunLogger

    first = RunLogger(tmp_path)
    for step in range(1, 11):
        first.log({"x": float(step)}, step)
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "x": 1')  # the process was killed mid-line
    resumed = RunLogger(tmp_path)
    resumed.rewind(6)
    for step in range(7, 9):
        resumed.log({"x": -float(step)}, step)
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(s, float(s)) for s in range(1, 7)] + [(7, -7.0), (8, -8.0)]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(s, float(s)) for s in range(1, 7)] + [
        (7, -7.0),
        (8, -8.0),
    ]
    with pytest.raises(RuntimeError, match="before the first log"):
        resumed.rewind(3)


def test_a_stopped_run_keeps_its_episode_end_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, straight):
    import os
    import signal

    from loopwm.checkpoint import read_checkpoint

    planned = Agent.planned_action
    calls = []

    def plan_then_kill(self, obs, **kw):
        calls.extend([] if kw["eval_mode"] else [1])
        if len(calls) == 50:  # step 150: mid-episode, ten steps after the last episode-end checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return planned(self, obs, **kw)

    monkeypatch.setattr(Agent, "planned_action", plan_then_kill)
    cfg = tiny(tmp_path / "b", **STRAIGHT)
    with pytest.raises(SystemExit) as exited:
        run(cfg, progress=False)
    assert exited.value.code == 128 + signal.SIGTERM
    path = tmp_path / "b" / "pm" / "checkpoints" / "latest.pt"
    assert read_checkpoint(path)["progress"]["step"] == 140  # not 150: that state's open episode would be lost
    monkeypatch.setattr(Agent, "planned_action", planned)
    cfg.resume = True
    assert run(cfg, progress=False)["curve"][-1][0] == 160
    assert read_checkpoint(path)["progress"]["step"] == 160
    for a, b in zip(params(straight / "checkpoints" / "latest.pt"), params(path)):
        for key in a:
            assert torch.equal(a[key], b[key]), key  # as if it had never stopped


def test_evaluation_does_not_perturb_training_randomness(tmp_path):
    cfg = tiny(tmp_path)
    env = PointMass()
    agent = Agent(cfg, env.observation_space, env.action_space)
    gen_state = agent.planner.gen.get_state()
    torch_state = torch.get_rng_state()
    evaluate(agent, 1, seed=0)
    assert torch.equal(agent.planner.gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_the_reinforce_actor_and_the_value_learn_from_one_rollout(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, prior_horizon=4)
    agent = Agent(cfg, PointMass.observation_space, gym.spaces.Discrete(3))
    assert agent.prior.gradient == "reinforce"  # "auto" with categorical actions
    for net in (agent.value.net, agent.value.target):  # values that differ from latent to latent
        torch.nn.init.normal_(net[-1].weight)
    t, b = cfg.train.horizon, 5
    batch = {"obs": torch.randn(t + 1, b, 1), "rewards": torch.randn(t, b), "terminated": torch.zeros(t, b)}
    monkeypatch.setattr(agent.trainer, "update", lambda: {})
    monkeypatch.setattr(agent.replay, "sample", lambda *args: batch)
    seen = {}

    def spy(owner, name):
        method = getattr(owner, name)

        def wrapped(*args, **kwargs):
            seen[owner, name] = (kwargs, method(*args, **kwargs))
            return seen[owner, name][1]

        monkeypatch.setattr(owner, name, wrapped)

    for owner, name in ((agent.prior, "rollout"), (agent.prior, "update"), (agent.value, "update")):
        spy(owner, name)
    out = agent.update()
    rollout = seen[agent.prior, "rollout"][1]
    assert seen[agent.prior, "update"][0]["rollout"] is rollout  # the actor learns from the rollout made once
    assert rollout.states.shape[:2] == (5, t * b)  # horizon 4 from every latent but each sequence's last
    latents = agent.wm.encode(batch["obs"])
    torch.testing.assert_close(rollout.states[0], latents[:-1].reshape(t * b, -1))
    imagined = seen[agent.value, "update"][0]["imagined"]
    assert rollout.returns[0].std() > 0.1
    torch.testing.assert_close(imagined, rollout.returns[0].view(t, b))  # time-major, as the replay latents
    assert {"value/value_loss", "prior/prior_loss"} <= set(out)


def test_a_decaying_schedule_spans_the_online_runs_updates_not_train_updates(tmp_path):
    raw = to_dict(tiny(tmp_path))  # 300 steps at 0.5 updates per step: 150 planned updates
    cfg = from_dict({**raw, "train": {**raw["train"], "updates": 10, "lr_schedule": "cosine"}})
    env = PointMass()
    factor = Agent(cfg, env.observation_space, env.action_space).trainer.schedule.lr_lambdas[0]
    assert factor(10) > 0.9  # still near the full rate where `loopwm train` would have stopped
    assert factor(75) == pytest.approx(0.5)
    assert factor(150) == pytest.approx(0.0, abs=1e-12)


def test_refuses_to_overwrite_a_run(tmp_path):
    from loopwm.config import ConfigError

    cfg = tiny(tmp_path, total_steps=40, seed_steps=40)
    run(cfg, progress=False)
    with pytest.raises(ConfigError, match="resume=true"):
        run(cfg, progress=False)


def test_eval_refuses_a_checkpoint_with_an_untrained_continue_head(tmp_path):
    from loopwm.app.evaluate import evaluate_planner
    from loopwm.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint

    run(tiny(tmp_path, total_steps=40, seed_steps=40), progress=False)
    path = tmp_path / "pm" / "checkpoints" / "latest.pt"
    payload = read_checkpoint(path)
    payload["config"]["train"]["w_continue"] = 0.0
    atomic_torch_save(payload, path)
    with pytest.raises(CheckpointError, match="w_continue=0 leaves the continue head untrained"):
        evaluate_planner(path, 1)
    payload["config"]["train"]["no_such_key"] = 1
    atomic_torch_save(payload, path)
    with pytest.raises(CheckpointError, match="invalid config section.*no_such_key"):
        evaluate_planner(path, 1)


def counting_planner_calls(monkeypatch) -> list[int]:
    """Record the batch size of every training-time planner call (evaluation calls excluded)."""
    planned, sizes = Agent.planned_action, []

    def spy(self, obs, **kw):
        if not kw["eval_mode"]:
            sizes.append(len(obs) if kw.get("batched") else 1)
        return planned(self, obs, **kw)

    monkeypatch.setattr(Agent, "planned_action", spy)
    return sizes


def stored_transitions(path) -> int:
    from loopwm.checkpoint import read_checkpoint

    replay = read_checkpoint(path)["replay"]
    return int(replay["episode_lengths"].sum()) + sum(len(ep["actions"]) for ep in replay["open"])


@pytest.mark.parametrize("num_envs", [1, 4])
def test_num_envs_collects_that_many_transitions_per_planner_call(tmp_path, monkeypatch, num_envs):
    sizes = counting_planner_calls(monkeypatch)
    cfg = tiny(tmp_path, total_steps=80, seed_steps=40, eval_episodes=1, updates_per_step=0.25)
    cfg.env.num_envs = num_envs
    summary = run(cfg, progress=False)
    assert summary["curve"][-1][0] == 80 and summary["episodes"] == 4
    assert len(sizes) == 40 // num_envs and set(sizes) == {num_envs}  # one batched call per step of all envs
    latest = tmp_path / "pm" / "checkpoints" / "latest.pt"
    assert stored_transitions(latest) == 80
    # the k-th episode started is seeded seed + k, whichever env it ran in
    from loopwm.checkpoint import read_checkpoint

    replay = read_checkpoint(latest)["replay"]
    starts = np.concatenate([[0], np.cumsum(replay["episode_lengths"].numpy() + 1)[:-1]])
    first_obs = sorted(float(replay["obs"][s, 0]) for s in starts)
    assert first_obs == sorted(float(PointMass().reset(seed=k)[0][0]) for k in range(4))


def test_a_vector_run_resumes_exactly(tmp_path):
    def vector(root, steps):
        cfg = tiny(root, total_steps=steps, seed_steps=40, eval_episodes=1, updates_per_step=0.25)
        cfg.env.num_envs = 4
        return cfg

    run(vector(tmp_path / "a", 160), progress=False)
    run(vector(tmp_path / "b", 80), progress=False)  # stops where all four episodes end together
    resumed = vector(tmp_path / "b", 160)
    resumed.resume = True
    run(resumed, progress=False)
    for a, b in zip(
        params(tmp_path / "a" / "pm" / "checkpoints" / "latest.pt"),
        params(tmp_path / "b" / "pm" / "checkpoints" / "latest.pt"),
    ):
        for key in a:
            assert torch.equal(a[key], b[key]), key

    def rows(root):  # the interrupted run also evaluated at its last step, 80
        lines = (root / "pm" / "metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], {k: v for k, v in r.items() if "perf/" not in k and "ms_per" not in k})
            for r in map(json.loads, lines)
            if r["step"] != 80 or "eval/return_mean" not in r
        ]

    assert rows(tmp_path / "b") == rows(tmp_path / "a")
