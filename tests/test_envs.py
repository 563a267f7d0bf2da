"""Environment factory: families, seeding, Atari preprocessing, clear errors, vector envs, action mapping."""

import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.spaces import Box, Dict, Discrete, MultiBinary, MultiDiscrete, Tuple
from gymnasium.wrappers import TransformReward

from loopwm.config import AtariConfig, EnvConfig
from loopwm.envs import (
    action_dim,
    action_from_model,
    action_to_model,
    check_spaces,
    make_env,
    make_vector_env,
)
from loopwm.replay import ReplayBuffer


def rollout(env: gym.Env, steps: int, seed: int):
    """First obs and the next `steps` (obs, reward) of a reset with `seed` under seeded random actions."""
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        out.append((obs, reward))
        if terminated or truncated:
            break
    return out


@pytest.mark.parametrize("env_id, shape, n_actions", [("Pendulum-v1", (3,), 1), ("CartPole-v1", (4,), 2)])
def test_classic_control_shapes_dtypes_and_seeding(env_id, shape, n_actions):
    env = make_env(EnvConfig(id=env_id), seed=3)
    obs, _ = env.reset(seed=3)
    assert obs.shape == shape and obs.dtype == np.float32 and obs in env.observation_space
    assert action_dim(env.action_space) == n_actions
    first, second = rollout(env, 5, 3), rollout(make_env(EnvConfig(id=env_id), seed=3), 5, 3)
    for a, b in zip(first[1:], second[1:], strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_mujoco_v5_env_is_float32():
    pytest.importorskip("mujoco")
    env = make_env(EnvConfig(id="InvertedPendulum-v5"), seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,) and obs.dtype == np.float32
    obs, reward, *_ = env.step(env.action_space.sample())
    assert obs in env.observation_space and np.isfinite(reward)


def test_atari_preprocessing_sticky_actions_and_replayed_stacks():
    pytest.importorskip("ale_py")
    cfg = EnvConfig(id="ALE/Pong-v5", atari=AtariConfig(sticky_actions=0.1))
    env = make_env(cfg, seed=0)
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.1)
    assert isinstance(env, TransformReward) and not isinstance(make_env(cfg, training=False), TransformReward)
    stacks, actions = [env.reset(seed=0)[0]], []
    for _ in range(12):
        actions.append(env.action_space.sample())
        obs, reward, terminated, truncated, _ = env.step(actions[-1])
        stacks.append(obs)
        assert reward in (-1.0, 0.0, 1.0) and not (terminated or truncated)
    stacks = np.stack(stacks)
    assert stacks.shape == (13, 4, 84, 84) and stacks.dtype == np.uint8
    buffer = ReplayBuffer((4, 84, 84), action_dim(env.action_space), 100, obs_dtype=np.uint8, frame_stack=4)
    buffer.add_episode(
        stacks, action_to_model(np.array(actions), env.action_space), np.zeros(12), np.zeros(12), np.zeros(12)
    )
    np.testing.assert_array_equal(next(buffer.episodes())["obs"], stacks)


@pytest.mark.parametrize(
    "env_id, module, extra",
    [
        ("InvertedPendulum-v5", "mujoco", "mujoco"),
        ("ALE/Pong-v5", "ale_py", "atari"),
    ],
)
def test_missing_extra_names_the_pip_extra(monkeypatch, env_id, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"{env_id}.*pip install 'loopwm\[{extra}\]'"):
        make_env(EnvConfig(id=env_id))


def test_unknown_env_id_is_named():
    with pytest.raises(ValueError, match="'Pendulum-v9'.*did you mean Pendulum-v1"):
        make_env(EnvConfig(id="Pendulum-v9"))
    with pytest.raises(ValueError, match="'NoSuchEnv-v0'"):
        make_env(EnvConfig(id="NoSuchEnv-v0"))


@pytest.mark.parametrize(
    "obs_space, act_space, named",
    [
        (Dict({"x": Dict({"y": Box(-1, 1, (2,))})}), Discrete(2), "key 'x' is nested"),
        (Dict({"x": Discrete(3)}), Discrete(2), "observation space key 'x' of Discrete"),
        (Dict({}), Discrete(2), "the Dict has no keys"),
        (Discrete(16), Discrete(4), "observation space Discrete"),
        (Box(-1, 1, (2,)), Tuple((Discrete(2), Discrete(2))), "action space Tuple"),
        (Box(-1, 1, (2,)), MultiDiscrete([[2, 3], [2, 2]]), "1-D MultiDiscrete"),
        (Box(-1, 1, (2,)), MultiBinary([2, 2]), "action space MultiBinary"),
        (Box(-1, 1, (2,)), Box(-np.inf, np.inf, (2,)), "finite bounds"),
        (Box(-1, 1, (2,)), Box(-1, 1, (2, 2)), "1-D Box"),
    ],
)
def test_unsupported_spaces_are_named(obs_space, act_space, named):
    with pytest.raises(ValueError, match=named):
        check_spaces(obs_space, act_space)


def test_make_env_rejects_an_env_with_unsupported_spaces():
    with pytest.raises(ValueError, match="observation space Discrete"):
        make_env(EnvConfig(id="FrozenLake-v1"))


def test_time_limit_and_action_repeat():
    env = make_env(EnvConfig(id="Pendulum-v1", max_episode_steps=6, action_repeat=3), seed=0)
    base = make_env(EnvConfig(id="Pendulum-v1"), seed=0)
    env.reset(seed=0)
    base.reset(seed=0)
    action = np.array([0.5], np.float32)
    for step in range(2):
        obs, reward, _, truncated, _ = env.step(action)
        base_rewards = [base.step(action)[1] for _ in range(3)]
        assert reward == pytest.approx(sum(base_rewards))
        assert truncated == (step == 1)


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_vector_env_is_batched_and_seeded(vectorization):
    cfg = EnvConfig(id="CartPole-v1", num_envs=2, vectorization=vectorization)
    firsts = []
    for _ in range(2):
        envs = make_vector_env(cfg, seed=5)
        obs, _ = envs.reset(seed=5)
        obs2, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
        assert obs.shape == obs2.shape == (2, 4) and obs.dtype == np.float32 and rewards.shape == (2,)
        firsts.append((obs, obs2))
        envs.close()
    np.testing.assert_array_equal(firsts[0][0], firsts[1][0])
    np.testing.assert_array_equal(firsts[0][1], firsts[1][1])
    for i in range(2):  # sub-env i is seeded with seed + i
        np.testing.assert_array_equal(firsts[0][0][i], make_env(cfg).reset(seed=5 + i)[0])


def test_box_action_round_trip():
    space = Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32))
    actions = np.random.default_rng(0).uniform(space.low, space.high, size=(64, 2)).astype(np.float32)
    x = action_to_model(actions, space)
    assert x.shape == (64, 2) and x.dtype == np.float32 and np.all(np.abs(x) <= 1)
    np.testing.assert_allclose(action_from_model(x, space), actions, atol=1e-5)
    np.testing.assert_array_equal(action_to_model(np.stack([space.low, space.high]), space), [[-1, -1], [1, 1]])
    np.testing.assert_array_equal(action_from_model(np.array([[-3.0, 3.0]]), space), [[-2.0, 10.0]])
    assert action_from_model(x[0], space).shape == (2,) and action_from_model(x, space).dtype == np.float32


def test_discrete_action_round_trip():
    space = Discrete(4, start=1)
    actions = np.array([1, 2, 3, 4, 2])
    onehot = action_to_model(actions, space)
    np.testing.assert_array_equal(onehot, np.eye(4, dtype=np.float32)[actions - 1])
    np.testing.assert_array_equal(action_from_model(onehot, space), actions)
    assert action_from_model(np.array([0.1, 0.7, 0.1, 0.1]), space) == 2


def test_each_family_builds_its_envs_and_names_its_replay_layout():
    from loopwm.config import from_dict
    from loopwm.envs import family_of, replay_buffer

    assert family_of("Pendulum-v1").name == family_of("CartPole-v1").name == "classic"
    assert family_of("ALE/Pong-v5").name == "atari"  # by the id's namespace; ale_py is not needed to say so
    atari = from_dict({"env": {"id": "ALE/Pong-v5", "atari": {"frame_stack": 3}}})
    assert family_of("ALE/Pong-v5").layout(atari.env).frame_stack == 3
    assert family_of("Pendulum-v1").layout(EnvConfig()).frame_stack == 1
    stacked = replay_buffer(atari, Box(0, 255, (3, 84, 84), np.uint8), Discrete(6))
    assert stacked.frame_stack == 3 and stacked.action_dim == 6 and stacked.obs_dtype == np.uint8


def test_mujoco_is_recognised_by_its_env_class_not_its_name():
    pytest.importorskip("mujoco")
    from gymnasium.envs.mujoco.inverted_pendulum_v5 import InvertedPendulumEnv

    from loopwm.envs import family_of

    class Wobbly(InvertedPendulumEnv):  # a user's own MuJoCo task, registered outside gymnasium.envs.mujoco
        pass

    gym.register("loopwm-test/Wobbly-v0", entry_point=Wobbly, max_episode_steps=50)
    assert family_of("InvertedPendulum-v5").name == family_of("loopwm-test/Wobbly-v0").name == "mujoco"
    env = make_env(EnvConfig(id="loopwm-test/Wobbly-v0"), seed=0)
    assert env.observation_space.dtype == np.float32 and env.reset(seed=0)[0].dtype == np.float32
