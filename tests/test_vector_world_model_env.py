"""VectorWorldModelEnv: one batched forward that behaves as N WorldModelEnvs, with Gymnasium's autoreset modes."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import AutoresetMode

from loopwm.envs import VectorWorldModelEnv, WorldModelEnv
from loopwm.exits import LoopOptions
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel
from tests.helpers import tiny_config

PENDULUM = gym.make("Pendulum-v1")


def with_rewards(wm: WorldModel) -> WorldModel:
    """The reward head starts at exactly zero; random output weights make rewards differ per state."""
    with torch.no_grad():
        wm.reward_head.net[-1].weight.normal_()
    return wm


def pendulum_model(**model) -> WorldModel:
    return with_rewards(WorldModel.from_config(tiny_config(**model), PENDULUM.observation_space, PENDULUM.action_space))


def discrete_model() -> WorldModel:
    return with_rewards(WorldModel.from_config(tiny_config(), Box(-np.inf, np.inf, (4,), np.float32), Discrete(3)))


def never_ends(wm: WorldModel) -> WorldModel:
    """The same model with its continue head pinned near 1, so only the time limit ends episodes."""
    with torch.no_grad():
        wm.continue_head[-1].bias.fill_(20.0)
    return wm


def starts(wm: WorldModel, n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (n, *wm.spec.obs_shape)).astype(np.float32)
    return obs


def test_one_env_matches_world_model_env_step_for_step_across_episodes():
    for wm, loop in (
        (pendulum_model(), LoopOptions(exit="certified", tol=1e-3, max_loops=32)),
        (discrete_model(), LoopOptions(loops=3)),
    ):
        data = starts(wm)
        single = WorldModelEnv(wm, reset_obs=data, max_episode_steps=4, options=loop)
        vector = VectorWorldModelEnv(wm, 1, reset_obs=data, max_episode_steps=4, options=loop)
        actions = [single.action_space.sample() for _ in range(13)]
        obs, _ = single.reset(seed=7)
        vobs, _ = vector.reset(seed=7)
        np.testing.assert_array_equal(vobs[0], obs)
        ended = False
        for a in actions:
            vobs, vr, vterm, vtrunc, vinfo = vector.step(np.asarray(a)[None])
            if ended:  # NEXT_STEP: this step only restarts the env, as a manual reset() does
                obs, _ = single.reset()
                ended = False
                assert vr[0] == 0.0 and not vterm[0] and not vtrunc[0] and not vinfo["_loops_used"][0]
            else:
                obs, r, term, trunc, info = single.step(a)
                assert vr[0] == r and vterm[0] == term and vtrunc[0] == trunc
                for key in ("loops_used", "bound", "converged", "kappa", "continue_prob"):
                    assert vinfo[key][0] == pytest.approx(info[key], rel=1e-6), key
                ended = term or trunc
            np.testing.assert_array_equal(vobs[0], obs)


def test_a_batch_steps_like_independent_envs_seeded_seed_plus_i():
    wm = never_ends(pendulum_model())
    data = starts(wm)
    n, steps = 5, 6
    vector = VectorWorldModelEnv(
        wm, n, reset_obs=data, observation_space=PENDULUM.observation_space, max_episode_steps=None
    )
    actions = np.random.default_rng(0).uniform(-2, 2, (steps, n, 1)).astype(np.float32)
    vobs = [vector.reset(seed=11)[0]] + [vector.step(a)[0] for a in actions]
    for i in range(n):
        single = WorldModelEnv(wm, reset_obs=data, observation_space=PENDULUM.observation_space, max_episode_steps=None)
        obs = [single.reset(seed=11 + i)[0]] + [single.step(a[i])[0] for a in actions]
        np.testing.assert_allclose(np.stack([v[i] for v in vobs]), np.stack(obs), rtol=1e-5, atol=1e-5)


def run_modes(wm, mode, steps=9, limit=3, n=3):
    env = VectorWorldModelEnv(wm, n, reset_obs=starts(wm), max_episode_steps=limit, autoreset_mode=mode)
    first, _ = env.reset(seed=0)
    action = np.zeros((n, 1), np.float32)
    return env, first, [env.step(action) for _ in range(steps)]


def test_next_step_autoreset_restarts_on_the_step_after_the_end():
    env, first, out = run_modes(never_ends(pendulum_model()), AutoresetMode.NEXT_STEP)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    truncated = np.array([o[3][0] for o in out])
    assert truncated.tolist() == [False, False, True, False, False, False, True, False, False]
    restart = out[3]  # the step after the truncation: reward 0, no flags, loop statistics masked off
    assert (restart[1] == 0).all() and not restart[2].any() and not restart[3].any()
    assert (out[2][1] != 0).all() and (out[4][1] != 0).all()  # ordinary steps do have rewards
    assert not restart[4]["_loops_used"].any() and (restart[4]["loops_used"] == 0).all()
    assert out[2][4]["_loops_used"].all() and (out[2][4]["loops_used"] > 0).all()
    fresh = VectorWorldModelEnv(env.wm, 3, reset_obs=starts(env.wm))  # the second draw of the same generators
    fresh.reset(seed=0)
    second = fresh.reset()[0]
    np.testing.assert_array_equal(restart[0], second)
    assert not np.array_equal(second, first)


def test_same_step_autoreset_reports_the_final_observation_and_returns_the_new_start():
    wm = never_ends(pendulum_model())
    _, _, nxt = run_modes(wm, AutoresetMode.NEXT_STEP)
    env, _, same = run_modes(wm, AutoresetMode.SAME_STEP, steps=8)
    # SAME_STEP skips NEXT_STEP's restart step: its step 2 ends and restarts, NEXT_STEP needs steps 2 and 3
    obs, reward, _, truncated, info = same[2]
    assert truncated.all() and info["_final_obs"].all() and info["_final_info"].all()
    for i in range(3):
        np.testing.assert_array_equal(info["final_obs"][i], nxt[2][0][i])
    np.testing.assert_array_equal(obs, nxt[3][0])
    np.testing.assert_array_equal(reward, nxt[2][1])
    np.testing.assert_array_equal(info["final_info"]["loops_used"], nxt[2][4]["loops_used"])
    for k in (3, 4):  # the second episode runs one step earlier
        np.testing.assert_allclose(same[k][0], nxt[k + 1][0], rtol=1e-6)
    np.testing.assert_allclose(np.stack(same[5][4]["final_obs"]), nxt[6][0], rtol=1e-6)
    np.testing.assert_allclose(same[5][0], nxt[7][0], rtol=1e-6)
    assert "final_obs" not in same[3][4]


def test_same_step_final_info_marks_only_the_envs_that_ended():
    env = VectorWorldModelEnv(
        never_ends(pendulum_model()),
        3,
        reset_obs=starts(pendulum_model()),
        max_episode_steps=2,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    env.reset(seed=0)
    action = np.zeros((3, 1), np.float32)
    env.step(action)
    env.reset(options={"reset_mask": np.array([False, True, False])})  # env 1 starts again: it ends a step later
    _, _, _, truncated, info = env.step(action)
    ended = np.array([True, False, True])
    np.testing.assert_array_equal(truncated, ended)
    np.testing.assert_array_equal(info["_final_obs"], ended)
    np.testing.assert_array_equal(info["_final_info"], ended)
    for key in ("_loops_used", "_bound", "_converged", "_continue_prob", "_kappa"):
        np.testing.assert_array_equal(info["final_info"][key], ended)  # as gymnasium's SyncVectorEnv
        assert info[key].all()  # this step's own info covers every env


def test_disabled_autoreset_needs_a_masked_reset():
    env, _, out = run_modes(never_ends(pendulum_model()), AutoresetMode.DISABLED, steps=3)
    assert out[2][3].all()
    with pytest.raises(gym.error.ResetNeeded, match=r"envs \[0, 1, 2\] ended"):
        env.step(np.zeros((3, 1), np.float32))
    before = env._observations()
    obs, _ = env.reset(options={"reset_mask": np.array([True, False, False])})
    np.testing.assert_array_equal(obs[1:], before[1:])  # unmasked envs keep their state
    assert not np.array_equal(obs[0], before[0])
    with pytest.raises(gym.error.ResetNeeded, match=r"envs \[1, 2\] ended"):
        env.step(np.zeros((3, 1), np.float32))
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": np.zeros(3, bool)})


def test_info_per_env_under_the_certified_exit():
    wm = pendulum_model()
    env = VectorWorldModelEnv(wm, 8, reset_obs=starts(wm), options=LoopOptions(exit="certified", tol=1e-2))
    env.reset(seed=0)
    _, rewards, terminated, truncated, info = env.step(env.action_space.sample())
    assert rewards.shape == (8,) and rewards.dtype == np.float64 and len(set(rewards.tolist())) == 8
    assert terminated.dtype == bool and truncated.dtype == bool and terminated.shape == (8,)
    assert info["loops_used"].shape == (8,) and (info["loops_used"] >= 1).all()
    assert ((info["bound"] <= 1e-2) == info["converged"]).all()
    assert (info["kappa"] == wm.certified_lipschitz()).all() and info["kappa"][0] < 1
    assert (terminated == (info["continue_prob"] < 0.5)).all()
    assert all(info[f"_{k}"].all() for k in ("loops_used", "bound", "converged", "kappa", "continue_prob"))


def test_observation_bounds_come_from_the_real_space():
    wm = pendulum_model()
    wm.set_obs_stats(torch.zeros(3), torch.full((3,), 100.0))  # decodes far outside the real bounds
    env = VectorWorldModelEnv(wm, 64, reset_obs=PENDULUM, observation_space=PENDULUM.observation_space)
    assert env.single_observation_space == PENDULUM.observation_space
    assert env.single_action_space == PENDULUM.action_space
    env.reset(seed=0)
    obs = env.step(np.zeros((64, 1), np.float32))[0]
    assert obs in env.observation_space
    assert np.isin(np.abs(obs), [1.0, 8.0]).any()  # some were clipped to the bounds
    unbounded = VectorWorldModelEnv(wm, 2, reset_obs=PENDULUM)
    assert np.isinf(unbounded.single_observation_space.high).all()
    with pytest.raises(ValueError, match="observation space .* the model was trained on a Box of shape"):
        VectorWorldModelEnv(wm, 2, observation_space=Box(-1, 1, (4,), np.float32))


def test_starts_from_a_replay_buffer_a_dataset_or_the_real_env(tmp_path):
    wm = pendulum_model()
    buffer = ReplayBuffer((3,), 1, 1000)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (11, 3)).astype(np.float32)
    buffer.add_episode(obs, np.zeros((10, 1), np.float32), np.zeros(10), np.zeros(10, bool), np.eye(10, dtype=bool)[-1])
    buffer.save(tmp_path / "data.npz")
    for source in (buffer, str(tmp_path / "data.npz")):
        env = VectorWorldModelEnv(wm, 32, reset_obs=source)
        first = env.reset(seed=0)[0]
        rows = {o.tobytes() for o in obs[:-1]}  # stored observations with a successor
        assert {o.tobytes() for o in first} <= rows and len({o.tobytes() for o in first}) > 3
    real = VectorWorldModelEnv(wm, 2, reset_obs=PENDULUM).reset(seed=3)[0]
    np.testing.assert_array_equal(real[0], PENDULUM.reset(seed=int(np.random.default_rng(3).integers(2**31)))[0])
    given = VectorWorldModelEnv(wm, 2).reset(options={"obs": obs[:2]})[0]
    np.testing.assert_array_equal(given, obs[:2])


def test_bad_input_gets_clear_errors():
    wm = pendulum_model()
    env = VectorWorldModelEnv(wm, 4, reset_obs=starts(wm))
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        env.step(np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match="no start observations"):
        VectorWorldModelEnv(wm, 2).reset(seed=0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(4,\).*expected numbers of shape \(4, 1\)"):
        env.step(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="outside the action space's bounds"):
        env.step(np.full((4, 1), 2.5, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full((4, 1), np.nan, np.float32))
    bad = starts(wm, 4)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        env.reset(options={"obs": bad})
    with pytest.raises(ValueError, match=r"shape \(3, 3\); expected \(4, 3\)"):
        env.reset(options={"obs": bad[:3]})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"state": bad})
    with pytest.raises(ValueError, match="num_envs"):
        VectorWorldModelEnv(wm, 0)
    with pytest.raises(ValueError, match="autoreset_mode"):
        VectorWorldModelEnv(wm, 2, autoreset_mode="sometimes")
    discrete = VectorWorldModelEnv(discrete_model(), 2, reset_obs=np.zeros((1, 4), np.float32))
    discrete.reset(seed=0)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        discrete.step(np.array([0, 3]))
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        discrete.step(np.array([0.0, 1.0]))


def test_same_seed_same_trajectory_and_latent_observations():
    wm = pendulum_model()

    def trajectory(decode_obs):
        env = VectorWorldModelEnv(wm, 3, reset_obs=starts(wm), max_episode_steps=2, decode_obs=decode_obs)
        env.action_space.seed(4)
        out = [env.reset(seed=4)[0]]
        for _ in range(5):
            out.append(env.step(env.action_space.sample())[0])
        return np.stack(out)

    np.testing.assert_array_equal(trajectory(True), trajectory(True))
    latents = trajectory(False)
    assert latents.shape == (6, 3, wm.latent_dim)
    with torch.no_grad():
        z0 = wm.encode(torch.as_tensor(trajectory(True)[0])).numpy()
    np.testing.assert_allclose(latents[0], z0, atol=1e-6)


def test_multidiscrete_and_multibinary_actions_step_as_one_hot_groups():
    from gymnasium.spaces import MultiBinary, MultiDiscrete

    obs_space = Box(-np.inf, np.inf, (2,), np.float32)
    for space, good, bad in (
        (MultiDiscrete([3, 2], start=[1, 0]), [[1, 0], [3, 1]], [[0, 0], [1, 1]]),
        (MultiBinary(3), [[0, 1, 1], [1, 0, 0]], [[0, 2, 1], [1, 0, 0]]),
    ):
        wm = WorldModel.from_config(tiny_config(), obs_space, space)
        env = VectorWorldModelEnv(wm, 2, reset_obs=np.zeros((1, 2), np.float32), action_space=space)
        rebuilt = VectorWorldModelEnv(wm, 2, reset_obs=np.zeros((1, 2), np.float32)).single_action_space
        assert env.single_action_space == space and rebuilt.shape == space.shape
        env.reset(seed=0)
        env.step(np.array(good))
        with pytest.raises(ValueError, match=f"{type(space).__name__} actions of shape \\(2, {space.shape[0]}\\)"):
            env.step(np.array(bad))
        with pytest.raises(ValueError, match="action space .* the model was trained on categorical actions"):
            VectorWorldModelEnv(wm, 2, action_space=MultiDiscrete([4, 4, 4, 4]))
