"""loopwm/WorldModel-v0 through gymnasium.make and make_vec, check_env on vector and pixel models, the SB3 adapter."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import loopwm
from loopwm.config import to_dict
from loopwm.envs import ENV_ID, VectorWorldModelEnv, WorldModelEnv
from loopwm.world_model import WorldModel
from tests.helpers import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*(infinity|normalized space|Box observation space)")


@pytest.fixture(scope="module")
def pendulum_checkpoint(tmp_path_factory):
    """A saved Pendulum model with its run config (so the real environment can be rebuilt)."""
    cfg = tiny_config()
    real = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    wm = WorldModel.from_config(cfg, real.observation_space, real.action_space)
    path = tmp_path_factory.mktemp("ckpt") / "pendulum.pt"
    loopwm.save(path, wm, config=to_dict(cfg))
    return path


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory):
    """A bare pixel model (no config): its starts must be given."""
    torch.manual_seed(0)
    wm = WorldModel.from_config(tiny_config(), Box(0, 255, (3, 64, 64), np.uint8), Discrete(4))
    path = tmp_path_factory.mktemp("ckpt") / "pixels.pt"
    loopwm.save(path, wm)
    return path


def test_make_builds_a_spec_carrying_env_with_the_real_bounds_and_time_limit(pendulum_checkpoint):
    env = gym.make(ENV_ID, checkpoint=str(pendulum_checkpoint))
    assert env.spec is not None and env.spec.id == ENV_ID
    assert env.spec.kwargs["checkpoint"] == str(pendulum_checkpoint)
    real = gym.make("Pendulum-v1")
    assert env.observation_space == real.observation_space and env.action_space == real.action_space
    assert isinstance(env.unwrapped, WorldModelEnv) and env.unwrapped.max_episode_steps == 200
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, real.reset(seed=int(np.random.default_rng(0).integers(2**31)))[0])
    env.close()


def test_the_time_limit_counts_model_steps_under_action_repeat(tmp_path):
    cfg = tiny_config()
    cfg.env.action_repeat = 3  # Pendulum's 200 steps are ceil(200 / 3) = 67 model steps
    real = gym.make("Pendulum-v1")
    path = tmp_path / "repeat.pt"
    loopwm.save(path, WorldModel.from_config(cfg, real.observation_space, real.action_space), config=to_dict(cfg))
    assert gym.make(ENV_ID, checkpoint=str(path)).unwrapped.max_episode_steps == 67
    vec = gym.make_vec(ENV_ID, num_envs=2, checkpoint=str(path))
    assert vec.unwrapped.max_episode_steps == 67


def test_check_env_passes_for_a_vector_and_a_pixel_model(pendulum_checkpoint, pixel_checkpoint):
    check_env(gym.make(ENV_ID, checkpoint=str(pendulum_checkpoint)).unwrapped)
    frames = np.random.default_rng(0).integers(0, 256, (5, 3, 64, 64), dtype=np.uint8)
    pixels = gym.make(ENV_ID, checkpoint=str(pixel_checkpoint), reset_obs=frames, render_mode="rgb_array")
    assert pixels.observation_space == Box(0, 255, (3, 64, 64), np.uint8)
    check_env(pixels.unwrapped)


def test_make_vec_uses_the_batched_env(pendulum_checkpoint):
    venv = gym.make_vec(ENV_ID, num_envs=16, checkpoint=str(pendulum_checkpoint), autoreset_mode="SameStep")
    assert isinstance(venv, VectorWorldModelEnv) and venv.num_envs == 16
    assert venv.spec is not None and venv.spec.id == ENV_ID and venv.spec.kwargs["num_envs"] == 16
    assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert venv.single_observation_space == gym.make("Pendulum-v1").observation_space
    obs, _ = venv.reset(seed=1)
    assert obs.shape == (16, 3) and obs in venv.observation_space
    obs, rewards, *_ = venv.step(venv.action_space.sample())
    assert obs.shape == (16, 3) and rewards.shape == (16,)
    venv.close()


def test_make_vec_starts_from_the_checkpoints_replay(tmp_path):
    from loopwm.replay import ReplayBuffer

    cfg = tiny_config()
    real = gym.make("Pendulum-v1")
    wm = WorldModel.from_config(cfg, real.observation_space, real.action_space)
    buffer = ReplayBuffer((3,), 1, 100)
    obs = np.random.default_rng(0).uniform(-1, 1, (6, 3)).astype(np.float32)
    buffer.add_episode(obs, np.zeros((5, 1), np.float32), np.zeros(5), np.zeros(5, bool), np.eye(5, dtype=bool)[-1])
    loopwm.save(tmp_path / "run.pt", wm, config=to_dict(cfg), replay=buffer.state_dict())
    venv = gym.make_vec(ENV_ID, num_envs=8, checkpoint=str(tmp_path / "run.pt"), reset_obs="replay")
    assert {o.tobytes() for o in venv.reset(seed=0)[0]} <= {o.tobytes() for o in obs[:-1]}
    loopwm.save(tmp_path / "bare.pt", wm)
    with pytest.raises(ValueError, match="holds no replay buffer"):
        gym.make_vec(ENV_ID, num_envs=2, checkpoint=str(tmp_path / "bare.pt"), reset_obs="replay")


def test_a_checkpoint_for_other_spaces_is_refused(pendulum_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"environment CartPole-v1 .* has observation space .* the model was trained"):
        gym.make(ENV_ID, checkpoint=str(pendulum_checkpoint), env="CartPole-v1")
    with pytest.raises(ValueError, match="action space .* the model was trained on Box"):
        gym.make_vec(ENV_ID, num_envs=2, checkpoint=str(pendulum_checkpoint), env=_wider_pendulum())
    with pytest.raises(loopwm.CheckpointError, match="does not exist"):
        gym.make(ENV_ID, checkpoint=str(tmp_path / "missing.pt"))


def _wider_pendulum() -> gym.Env:
    """Pendulum with a torque range of ±3: the same observations, another action space."""
    env = gym.make("Pendulum-v1")
    env.action_space = Box(-3.0, 3.0, (1,), np.float32)
    return env


def test_sb3_adapter_steps_the_batched_env_with_sb3_conventions():
    pytest.importorskip("stable_baselines3", reason="stable-baselines3 is in the [examples] extra")
    from stable_baselines3.common.vec_env import VecEnv

    from loopwm.envs.sb3 import SB3VecEnv

    real = gym.make("Pendulum-v1")
    wm = WorldModel.from_config(tiny_config(), real.observation_space, real.action_space)
    with torch.no_grad():
        wm.continue_head[-1].bias.fill_(20.0)  # only the time limit ends episodes
    starts = np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="autoreset_mode=SAME_STEP"):
        SB3VecEnv(VectorWorldModelEnv(wm, 4, reset_obs=starts))
    venv = VectorWorldModelEnv(
        wm,
        4,
        reset_obs=starts,
        observation_space=real.observation_space,
        max_episode_steps=2,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    sb3 = SB3VecEnv(venv)
    assert isinstance(sb3, VecEnv) and sb3.num_envs == 4 and sb3.observation_space == real.observation_space
    sb3.seed(3)
    obs = sb3.reset()
    reference = VectorWorldModelEnv(
        wm,
        4,
        reset_obs=starts,
        observation_space=real.observation_space,
        max_episode_steps=2,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    np.testing.assert_array_equal(obs, reference.reset(seed=3)[0])
    actions = np.zeros((4, 1), np.float32)
    obs, rewards, dones, infos = sb3.step(actions)
    ref = reference.step(actions)
    assert not dones.any() and infos == [{}, {}, {}, {}] and rewards.dtype == np.float32
    np.testing.assert_array_equal(obs, ref[0])
    obs, rewards, dones, infos = sb3.step(actions)
    ref = reference.step(actions)
    assert dones.all() and all(info["TimeLimit.truncated"] for info in infos)
    for i in range(4):
        np.testing.assert_array_equal(infos[i]["terminal_observation"], ref[4]["final_obs"][i])
    np.testing.assert_array_equal(obs, ref[0])  # already the new starts
    assert sb3.last_info["loops_used"].shape == (4,)
    assert sb3.get_attr("num_envs") == [4, 4, 4, 4] and sb3.env_is_wrapped(gym.Wrapper) == [False] * 4
    given = np.random.default_rng(1).uniform(-1, 1, (4, 3)).astype(np.float32)
    sb3.set_options([{"obs": row} for row in given])  # SB3's way to pass reset options, one dict per env
    np.testing.assert_array_equal(sb3.reset(), given)
    assert not np.array_equal(sb3.reset(), given)  # forgotten after one reset, as SB3 does
    sb3.set_options({"obs": given[0]})  # one dict for every env
    np.testing.assert_array_equal(sb3.reset(), np.repeat(given[:1], 4, 0))
    sb3.set_options({"state": given[0]})
    with pytest.raises(ValueError, match=r"every env needs exactly \{'obs'"):
        sb3.reset()
