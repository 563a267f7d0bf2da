"""WorldModelEnv: a real Gymnasium env that agrees step for step with the model's own rollout."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import RecordEpisodeStatistics, TimeLimit

from loopwm.envs import WorldModelEnv, action_to_model
from loopwm.exits import LoopOptions
from loopwm.world_model import WorldModel
from tests.helpers import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:.*(infinity|normalized space)")  # check_env advice, by design

PIXELS = (4, 84, 84)


def box_model() -> WorldModel:
    """Vector observations, a Box action with non-unit bounds (so unit conversion matters)."""
    return WorldModel.from_config(
        tiny_config(),
        Box(-np.inf, np.inf, (3,), np.float32),
        Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)),
    )


def discrete_model() -> WorldModel:
    return WorldModel.from_config(tiny_config(), Box(-np.inf, np.inf, (4,), np.float32), Discrete(3))


def pixel_model() -> WorldModel:
    return WorldModel.from_config(tiny_config(), Box(0, 255, PIXELS, np.uint8), Discrete(3))


def starts(wm: WorldModel, n: int = 8) -> np.ndarray:
    """A small dataset of start observations for `wm`."""
    rng = np.random.default_rng(0)
    if wm.spec.pixels:
        return rng.integers(0, 256, (n, *wm.spec.obs_shape), dtype=np.uint8)
    return rng.normal(size=(n, *wm.spec.obs_shape)).astype(np.float32)


def make(wm: WorldModel, **kwargs) -> WorldModelEnv:
    return WorldModelEnv(wm, reset_obs=starts(wm), **kwargs)


def rollout(env: gym.Env, seed: int, steps: int) -> list:
    """Reset with `seed`, then take `steps` actions sampled from the seeded action space."""
    env.action_space.seed(seed)
    out = [env.reset(seed=seed)[0]]
    for _ in range(steps):
        out.append(env.step(env.action_space.sample())[:4])
    return out


@pytest.mark.parametrize(
    "build, kwargs",
    [
        (box_model, {}),
        (discrete_model, {}),
        (pixel_model, {}),
        (box_model, {"decode_obs": False}),
    ],
)
def test_check_env_passes(build, kwargs):
    check_env(make(build(), max_episode_steps=10, **kwargs), skip_render_check=True)


def test_spaces_follow_the_model_spec():
    box = make(box_model())
    assert box.observation_space == Box(-np.inf, np.inf, (3,), np.float32)
    np.testing.assert_array_equal(box.action_space.low, [-2.0, 0.0])
    np.testing.assert_array_equal(box.action_space.high, [2.0, 1.0])
    assert box.metadata["render_modes"] == []
    pixels = make(pixel_model())
    assert pixels.observation_space == Box(0, 255, PIXELS, np.uint8)
    assert pixels.action_space == Discrete(3) and pixels.metadata["render_modes"] == ["rgb_array"]
    latent = make(box_model(), decode_obs=False)
    assert latent.observation_space == Box(-np.inf, np.inf, (16,), np.float32)


@pytest.mark.parametrize("build", [box_model, discrete_model])
def test_same_seed_gives_identical_trajectories(build):
    wm = build()
    first, second = rollout(make(wm), 3, 6), rollout(make(wm), 3, 6)
    np.testing.assert_array_equal(first[0], second[0])
    for (o1, r1, t1, u1), (o2, r2, t2, u2) in zip(first[1:], second[1:], strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert (r1, t1, u1) == (r2, t2, u2)
    starts_seen = {make(wm).reset(seed=s)[0].tobytes() for s in range(6)}
    assert len(starts_seen) > 1  # the start observation is drawn with np_random


@pytest.mark.parametrize(
    "build, options",
    [
        (box_model, None),
        (box_model, LoopOptions(exit="certified", tol=1e-3, max_loops=32)),
        (discrete_model, LoopOptions(loops=6)),
    ],
)
def test_steps_match_the_models_own_rollout(build, options):
    wm = build()
    env = make(wm, options=options)
    env.action_space.seed(1)
    actions = [env.action_space.sample() for _ in range(5)]
    obs0, _ = env.reset(seed=1)
    steps = [env.step(a) for a in actions]
    with torch.no_grad():
        z0 = wm.encode(torch.as_tensor(obs0[None]))
        model_actions = torch.as_tensor(action_to_model(np.stack(actions)[:, None], env.action_space))
        out = wm.imagine(z0, model_actions, decode="all", options=options)
    for k, (obs, reward, terminated, _, info) in enumerate(steps):
        np.testing.assert_allclose(obs, out.obs[k, 0].numpy(), rtol=1e-5, atol=1e-5)
        assert reward == pytest.approx(float(out.rewards[k, 0]), rel=1e-5, abs=1e-6)
        assert terminated == bool(out.continues[k, 0] < 0.5)
        assert info["continue_prob"] == pytest.approx(float(out.continues[k, 0]), abs=1e-6)
        assert info["loops_used"] == int(out.loops[k, 0])
        assert info["bound"] == pytest.approx(float(out.bound[k, 0]), rel=1e-4, abs=1e-7)
        assert info["converged"] == bool(out.converged[k, 0])
    latent_env = make(wm, options=options, decode_obs=False)
    np.testing.assert_allclose(latent_env.reset(seed=1)[0], z0[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(latent_env.step(actions[0])[0], out.latents[1, 0].numpy(), atol=1e-5)


def test_info_fields_and_types():
    env = make(box_model(), options=LoopOptions(exit="certified", tol=1e-2))
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and isinstance(info, dict)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and type(reward) is float
    assert type(terminated) is bool and type(truncated) is bool
    assert type(info["loops_used"]) is int and info["loops_used"] >= 1
    assert type(info["bound"]) is float and info["bound"] >= 0.0
    assert type(info["converged"]) is bool and info["converged"] == (info["bound"] <= 1e-2)
    assert type(info["kappa"]) is float and 0.0 < info["kappa"] < 1.0
    assert type(info["continue_prob"]) is float and terminated == (info["continue_prob"] < 0.5)


def test_truncation_at_max_episode_steps_and_gymnasium_wrappers():
    env = make(discrete_model(), max_episode_steps=3)
    env.reset(seed=0)
    assert [env.step(0)[3] for _ in range(3)] == [False, False, True]
    env.reset(seed=0)
    assert env.step(0)[3] is False  # reset restarts the count
    wrapped = RecordEpisodeStatistics(TimeLimit(make(discrete_model(), max_episode_steps=None), 4))
    wrapped.reset(seed=0)
    for _ in range(4):
        _, _, _, truncated, info = wrapped.step(1)
    assert truncated and info["episode"]["l"] == 4


def test_invalid_actions_raise():
    env = make(box_model())
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.5], np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"\[5.0\] lies outside the action space's bounds"):
        env.step(np.array([5.0, 0.5], np.float32))
    env.step(np.array([2.0, 0.0], np.float32))  # the bounds themselves are inside
    discrete = make(discrete_model())
    discrete.reset(seed=0)
    for bad in (3, -1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
            discrete.step(bad)


def test_reset_options_and_errors():
    wm = box_model()
    obs = np.array([0.5, -1.0, 2.0], np.float32)
    env = WorldModelEnv(wm)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(env.action_space.sample())
    with pytest.raises(ValueError, match="no start observations"):
        env.reset(seed=0)
    first, _ = env.reset(seed=0, options={"obs": obs})
    after_first = env.step(np.zeros(2, np.float32))[0]
    with pytest.raises(ValueError, match="start observation contains NaN"):
        env.reset(seed=5, options={"obs": np.array([0.5, np.nan, 2.0], np.float32)})
    env.reset(seed=0, options={"obs": obs})
    np.testing.assert_array_equal(env.step(np.zeros(2, np.float32))[0], after_first)
    np.testing.assert_array_equal(first, obs)
    assert first is not obs
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"state": obs})
    with pytest.raises(ValueError, match="shape"):
        env.reset(options={"obs": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="start observations have shape"):
        WorldModelEnv(wm, reset_obs=np.zeros((5, 4), np.float32))
    sampled = WorldModelEnv(wm, reset_obs=lambda rng: rng.normal(size=3).astype(np.float32))
    np.testing.assert_array_equal(sampled.reset(seed=2)[0], sampled.reset(seed=2)[0])
    with pytest.raises(ValueError, match="max_episode_steps"):
        WorldModelEnv(wm, max_episode_steps=0)


def test_render_decodes_pixel_frames():
    wm = pixel_model()
    env = make(wm, render_mode="rgb_array")
    env.reset(seed=0)
    obs, *_ = env.step(1)
    frame = env.render()
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame[..., 0], obs[-1])  # the newest stacked frame, in grey
    assert obs.dtype == np.uint8 and obs in env.observation_space
    with pytest.raises(ValueError, match="render_mode"):
        make(box_model(), render_mode="rgb_array")


class Float64Env(gym.Env):
    """A real env with MuJoCo's float64 observations and the box model's action bounds."""

    observation_space = Box(-10.0, 10.0, (3,), np.float64)
    action_space = Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3), {}

    def step(self, action):
        return self.np_random.normal(size=3), 0.0, False, False, {}


def test_a_float64_env_counts_as_the_float32_model_it_was_cast_for():
    real = Float64Env()
    env = WorldModelEnv(box_model(), reset_obs=real, observation_space=real.observation_space)
    assert env.observation_space == Box(-10.0, 10.0, (3,), np.float32)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs in env.observation_space
    assert env.step(np.zeros(2, np.float32))[0].dtype == np.float32
    with pytest.raises(ValueError, match="dtype uint8"):  # a float model is not a pixel model
        WorldModelEnv(pixel_model(), observation_space=Box(0.0, 255.0, PIXELS, np.float64))
