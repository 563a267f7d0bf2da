"""ReplayBuffer: episode-bounded sampling, flags, frame stacks, vector autoreset, eviction and persistence."""

import io
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import FrameStackObservation

from loopwm.replay import ReplayBuffer
from loopwm.replay_io import DataError


def episode(ep: int, steps: int, end: str = "terminated", dim: int = 3):
    """An episode whose obs are [ep, step, 0...] and whose reward/action encode (ep, step)."""
    obs = np.zeros((steps + 1, dim), np.float32)
    obs[:, 0], obs[:, 1] = ep, np.arange(steps + 1)
    actions = np.stack([np.full(steps, ep), np.arange(steps)], axis=1).astype(np.float32)
    rewards = (1000 * ep + np.arange(steps)).astype(np.float32)
    terminated, truncated = np.zeros(steps, bool), np.zeros(steps, bool)
    if end in ("terminated", "both"):
        terminated[-1] = True
    if end in ("truncated", "both"):
        truncated[-1] = True
    return obs, actions, rewards, terminated, truncated


class CounterEnv(gym.Env):
    """Tiny pixel env: row 0 encodes (env id, episode, step); other pixels are seeded noise.

    Episodes last a random 3..12 steps and end terminated when the length is even, truncated otherwise.
    """

    observation_space = gym.spaces.Box(0, 255, (5, 6), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, env_id: int = 0):
        self.env_id, self.episode = env_id, -1

    def _obs(self):
        frame = self.np_random.integers(0, 256, (5, 6), dtype=np.uint8)
        frame[0, :3] = self.env_id, self.episode, self.step_count
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.step_count, self.length = 0, int(self.np_random.integers(3, 13))
        return self._obs(), {}

    def step(self, action):
        self.step_count += 1
        done = self.step_count == self.length
        return self._obs(), float(self.step_count), done and self.length % 2 == 0, done and self.length % 2 == 1, {}


def test_sequences_never_cross_episode_boundaries():
    buffer = ReplayBuffer((3,), 2, capacity=200)
    lengths = np.random.default_rng(0).integers(1, 30, size=40)
    for ep, steps in enumerate(lengths):
        buffer.add_episode(*episode(ep, int(steps)))
    assert len(buffer) <= 200 and buffer._head != 0  # the ring has wrapped
    kept = {int(e["obs"][0, 0]): len(e["rewards"]) for e in buffer.episodes()}
    rng, length, seen_final = np.random.default_rng(1), 8, False
    for _ in range(20):
        batch = buffer.sample(64, length, rng)
        obs, actions, rewards = batch["obs"].numpy(), batch["actions"].numpy(), batch["rewards"].numpy()
        assert obs.shape == (length + 1, 64, 3) and actions.shape == (length, 64, 2)
        for b in range(64):
            ep, start = int(obs[0, b, 0]), int(obs[0, b, 1])
            assert kept[ep] >= length
            np.testing.assert_array_equal(obs[:, b, 0], ep)
            np.testing.assert_array_equal(obs[:, b, 1], start + np.arange(length + 1))
            np.testing.assert_array_equal(actions[:, b, 1], start + np.arange(length))
            np.testing.assert_array_equal(rewards[:, b], 1000 * ep + start + np.arange(length))
            assert not (batch["terminated"][:-1, b].any() or batch["truncated"][:-1, b].any())
            seen_final |= int(obs[-1, b, 1]) == kept[ep]
    assert seen_final  # the final observation o_T is reachable


def test_sample_errors_are_clear():
    buffer = ReplayBuffer((3,), 2, capacity=100)
    buffer.add_episode(*episode(0, 4))
    with pytest.raises(ValueError, match="length=5.*longest 4"):
        buffer.sample(2, 5, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        buffer.sample(2, 2, 0)
    with pytest.raises(ValueError, match="not the last"):
        buffer.add_episode(*episode(1, 4)[:3], np.array([1, 0, 0, 0], bool), np.zeros(4, bool))
    with pytest.raises(ValueError, match="actions: expected shape"):
        buffer.add_episode(*(np.zeros((5, 3)), np.zeros((4, 3)), np.zeros(4), np.zeros(4), np.zeros(4)))


def test_terminated_and_truncated_survive_add_sample_save_and_load(tmp_path):
    buffer = ReplayBuffer((3,), 2, capacity=100)
    for ep, end in enumerate(["terminated", "truncated", "both", "open"]):
        buffer.add_episode(*episode(ep, 5, end))
    expected = {0: (True, False), 1: (False, True), 2: (True, True), 3: (False, False)}
    buffer.save(tmp_path / "data.npz")
    for source in (buffer, ReplayBuffer.load(tmp_path / "data.npz")):
        batch = source.sample(64, 5, np.random.default_rng(0))  # length 5 = whole episodes
        for b in range(64):
            ep = int(batch["obs"][0, b, 0])
            assert (bool(batch["terminated"][-1, b]), bool(batch["truncated"][-1, b])) == expected[ep]
            assert batch["terminated"].dtype == batch["truncated"].dtype == torch.bool


def assert_buffers_equal(a: ReplayBuffer, b: ReplayBuffer):
    assert (a.obs_shape, a.action_dim, a.capacity, a.obs_dtype, a.frame_stack) == (
        b.obs_shape,
        b.action_dim,
        b.capacity,
        b.obs_dtype,
        b.frame_stack,
    )
    assert len(a) == len(b) and a.num_episodes == b.num_episodes
    for x, y in zip(a.episodes(), b.episodes(), strict=True):
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_save_load_exact_and_resumable(tmp_path):
    buffer = ReplayBuffer((4, 5, 6), 2, capacity=40, obs_dtype=np.uint8, frame_stack=4)
    env = FrameStackObservation(CounterEnv(), 4)
    obs, _ = env.reset(seed=0)
    for _ in range(60):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, np.eye(2)[action], reward, next_obs, terminated, truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    path = tmp_path / "replay.npz"
    buffer.save(path)
    loaded = ReplayBuffer.load(path)
    assert_buffers_equal(buffer, loaded)
    assert not list(tmp_path.glob("*.tmp"))
    first, second = (b.sample(16, 3, np.random.default_rng(7)) for b in (buffer, loaded))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_state_dict_round_trip_with_weights_only_load():
    buffer = ReplayBuffer((5, 6), 2, capacity=500, obs_dtype=np.uint8)
    envs = gym.vector.SyncVectorEnv([lambda i=i: CounterEnv(i) for i in range(2)])
    obs, _ = envs.reset(seed=0)
    for _ in range(25):
        actions = envs.action_space.sample()
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        buffer.add_batch(obs, np.eye(2)[actions], rewards, next_obs, terminated, truncated)
        obs = next_obs
    assert buffer._open  # the checkpoint holds episodes that are still being streamed in
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer((5, 6), 2, capacity=500, obs_dtype=np.uint8)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    assert_buffers_equal(buffer, restored)
    for _ in range(25):  # both continue identically from the same stream
        actions = envs.action_space.sample()
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        for b in (buffer, restored):
            b.add_batch(obs, np.eye(2)[actions], rewards, next_obs, terminated, truncated)
        obs = next_obs
    assert_buffers_equal(buffer, restored)
    with pytest.raises(ValueError, match="obs_shape"):
        ReplayBuffer((5, 7), 2, capacity=500, obs_dtype=np.uint8).load_state_dict(buffer.state_dict())


def test_rebuilt_frame_stacks_equal_frame_stack_observation():
    env = FrameStackObservation(CounterEnv(), 3)
    buffer = ReplayBuffer((3, 5, 6), 2, capacity=1000, obs_dtype=np.uint8, frame_stack=3)
    real = {}  # (episode, step) -> stack returned by the env
    obs, _ = env.reset(seed=1)
    for ep in range(6):
        stacks, actions, rewards, flags = [obs], [], [], []
        while True:
            action = env.action_space.sample()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            stacks.append(next_obs)
            actions.append(np.eye(2)[action])
            rewards.append(reward)
            flags.append((terminated, truncated))
            if terminated or truncated:
                break
        flags = np.array(flags)
        buffer.add_episode(np.stack(stacks), np.stack(actions), np.array(rewards), flags[:, 0], flags[:, 1])
        real.update({(ep, k): s for k, s in enumerate(stacks)})
        obs, _ = env.reset()
    for ep, stored in enumerate(buffer.episodes()):
        np.testing.assert_array_equal(stored["obs"], np.stack([real[ep, k] for k in range(len(stored["obs"]))]))
    batch = buffer.sample(32, 2, np.random.default_rng(0))["obs"].numpy()
    for stack in batch.reshape(-1, 3, 5, 6):
        np.testing.assert_array_equal(stack, real[int(stack[-1, 0, 1]), int(stack[-1, 0, 2])])
    with pytest.raises(ValueError, match="consecutive frame stacks"):
        shuffled = np.stack([real[0, k] for k in (0, 2, 1)])
        buffer.add_episode(shuffled, np.zeros((2, 2)), np.zeros(2), np.zeros(2), np.zeros(2))


def test_add_batch_handles_next_step_autoreset():
    envs = gym.vector.SyncVectorEnv([lambda i=i: CounterEnv(i) for i in range(3)])
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    buffer = ReplayBuffer((5, 6), 2, capacity=1000, obs_dtype=np.uint8)
    obs, _ = envs.reset(seed=0)
    ended = 0
    for _ in range(80):
        actions = envs.action_space.sample()
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        buffer.add_batch(obs, np.eye(2)[actions], rewards, next_obs, terminated, truncated)
        ended += int((terminated | truncated).sum())
        obs = next_obs
    assert buffer.num_episodes == ended > 10
    for stored in buffer.episodes():
        header = stored["obs"][:, 0, :3].astype(int)
        steps = len(stored["rewards"])
        assert len(set(header[:, 0])) == 1 and len(set(header[:, 1])) == 1  # one env, one episode
        np.testing.assert_array_equal(header[:, 2], np.arange(steps + 1))
        np.testing.assert_array_equal(stored["rewards"], np.arange(1, steps + 1))
        assert stored["terminated"][-1] == (steps % 2 == 0) and stored["truncated"][-1] == (steps % 2 == 1)


def test_add_rejects_a_discontinuous_stream():
    buffer = ReplayBuffer((3,), 2, capacity=100)
    buffer.add(np.zeros(3), np.zeros(2), 0.0, np.ones(3), False, False)
    with pytest.raises(ValueError, match="does not continue"):
        buffer.add(np.full(3, 5.0), np.zeros(2), 0.0, np.ones(3), False, False)


def test_capacity_evicts_oldest_whole_episodes():
    buffer = ReplayBuffer((3,), 2, capacity=25)
    for ep in range(5):
        buffer.add_episode(*episode(ep, 10))
        assert len(buffer) <= 25
    assert [int(e["obs"][0, 0]) for e in buffer.episodes()] == [3, 4] and len(buffer) == 20
    with pytest.raises(ValueError, match="capacity=25"):
        buffer.add_episode(*episode(9, 26))


def test_atari_sized_storage_fits_well_under_a_gigabyte():
    buffer = ReplayBuffer((4, 84, 84), 18, capacity=1000, obs_dtype=np.uint8, frame_stack=4)
    stacks = np.zeros((101, 4, 84, 84), np.uint8)  # Atari episodes last hundreds of agent steps
    for _ in range(10):
        buffer.add_episode(stacks, np.zeros((100, 18)), np.zeros(100), np.zeros(100), np.zeros(100))
    per_step = buffer.nbytes / len(buffer)
    assert per_step < 1.05 * 84 * 84  # one frame per step, not a stack
    assert per_step * 100_000 < 0.75e9  # 100k Atari steps take about 720 MB


def test_split_is_deterministic_and_by_whole_episodes():
    buffer = ReplayBuffer((3,), 2, capacity=1000)
    for ep in range(20):
        buffer.add_episode(*episode(ep, 5 + ep))
    train, val = buffer.split(0.2, seed=3)
    ids = [{int(e["obs"][0, 0]) for e in b.episodes()} for b in (train, val)]
    assert len(ids[1]) == 4 and not ids[0] & ids[1] and ids[0] | ids[1] == set(range(20))
    assert len(train) + len(val) == len(buffer)
    again = buffer.split(0.2, seed=3)
    assert [{int(e["obs"][0, 0]) for e in b.episodes()} for b in again] == ids
    with pytest.raises(ValueError, match="at least 2 episodes"):
        ReplayBuffer((3,), 2, 100).split(0.1)


def test_stats_match_numpy():
    buffer = ReplayBuffer((3,), 2, capacity=1000)
    for ep in range(4):
        buffer.add_episode(*episode(ep, 7 + ep))
    every = np.concatenate([e["obs"] for e in buffer.episodes()])
    stats = buffer.stats()
    np.testing.assert_allclose(stats["obs_mean"].numpy(), every.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["obs_std"].numpy(), every.std(0), rtol=1e-6)


def test_corrupt_or_foreign_file_gives_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not a zip file")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3))
    truncated = tmp_path / "truncated.npz"
    buffer = ReplayBuffer((3,), 2, capacity=100)
    buffer.add_episode(*episode(0, 5))
    buffer.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (garbage, foreign, truncated):
        with pytest.raises(ValueError, match=path.name):
            ReplayBuffer.load(path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ReplayBuffer.load(tmp_path / "missing.npz")


def test_another_version_or_layout_in_a_file_names_the_field(tmp_path):
    buffer = ReplayBuffer((3,), 2, capacity=100)
    for ep in range(2):
        buffer.add_episode(*episode(ep, 4))
    buffer.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as data:
        members = {k: data[k] for k in data.files}
    meta = json.loads(str(members["meta"]))
    spoilt = {
        "version 2, expected 1": {"meta": np.array(json.dumps({**meta, "version": 2}))},
        "'obs' has shape .* float64": {"obs": members["obs"].astype(np.float64)},
        "at least one transition": {"episode_lengths": np.array([0, 8])},
    }
    for i, (message, change) in enumerate(spoilt.items()):
        np.savez(tmp_path / f"bad{i}.npz", **{**members, **change})
        with pytest.raises(DataError, match=rf"bad{i}\.npz.*{message}"):
            ReplayBuffer.load(tmp_path / f"bad{i}.npz")


def test_observations_that_would_lose_precision_are_refused():
    pixels = ReplayBuffer((2, 2), 1, capacity=100, obs_dtype=np.uint8)
    step = (np.zeros(1, np.float32), 0.0)
    with pytest.raises(ValueError, match="float32 cannot be stored as uint8"):
        pixels.add(np.zeros((2, 2), np.float32), *step, np.zeros((2, 2), np.float32), False, False)
    pixels.add(np.zeros((2, 2), np.int64), *step, np.ones((2, 2), np.int64), False, True)  # integers fit
    assert pixels.num_episodes == 1 and pixels.episodes().__next__()["obs"].dtype == np.uint8


def test_truncate_open_stores_streamed_episodes_as_truncated():
    buffer = ReplayBuffer((3,), 2, capacity=100)
    obs, actions, rewards, _, _ = episode(0, 3)
    for k in range(3):
        buffer.add(obs[k], actions[k], rewards[k], obs[k + 1], False, False, env=5)
    assert buffer.open_transitions == 3 and buffer.num_episodes == 0
    buffer.truncate_open()
    stored = next(buffer.episodes())
    assert buffer.open_transitions == 0 and buffer.num_episodes == 1
    np.testing.assert_array_equal(stored["obs"], obs)
    assert stored["truncated"].tolist() == [False, False, True] and not stored["terminated"].any()
