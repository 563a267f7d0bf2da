"""How episodes enter a replay buffer, checked at the door: whole, or streamed one transition at a time.

Streamed transitions are held per environment until their episode ends, and Gymnasium vector envs' autoreset
steps are skipped. With frame stacks (S, ...) only the newest frame of each step is kept, after checking that the
stacks are consecutive. The layout and the storage are the ReplayBuffer's (loopwm.replay).
"""

from __future__ import annotations

import numpy as np


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    """Same-kind casts, plus any integer to integer (frames often arrive as int64 from Python code)."""
    return np.can_cast(src, dst, "same_kind") or (np.issubdtype(src, np.integer) and np.issubdtype(dst, np.integer))


class EpisodeIntake:
    """The adding half of a ReplayBuffer: `add_episode`, `add`, `add_batch` and the episodes still streaming in.

    The buffer sets the layout below and supplies `_store(frames, actions, rewards, terminated, truncated)`,
    which appends one checked episode given as frames [T+1, ...].
    """

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    action_dim: int
    frame_stack: int

    @property
    def open_transitions(self) -> int:
        """Transitions of episodes still streaming in (not yet sampleable)."""
        return sum(len(ep["actions"]) for ep in self._open.values())

    def add_episode(
        self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> None:
        """Store one episode: obs [T+1, *obs_shape], actions [T, A], rewards/terminated/truncated [T]."""
        actions = np.asarray(actions)
        steps = len(actions)
        obs = self._check_obs(obs, (steps + 1,), "obs")
        if actions.shape != (steps, self.action_dim):
            raise ValueError(f"actions: expected shape ({steps}, {self.action_dim}), got {actions.shape}")
        flags = [np.asarray(x) for x in (rewards, terminated, truncated)]
        for name, x in zip(("rewards", "terminated", "truncated"), flags):
            if x.shape != (steps,):
                raise ValueError(f"{name}: expected shape ({steps},) to match actions, got {x.shape}")
        done = flags[1].astype(bool) | flags[2].astype(bool)
        if done[:-1].any():
            raise ValueError(
                f"transition {int(np.argmax(done))} is terminated/truncated but is not the last of the episode"
            )
        self._store(self._to_frames(obs, starts_episode=True), actions, *flags)

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
        env: int = 0,
    ) -> None:
        """Stream one transition of environment `env`; its episode is stored when it ends.

        `obs` must be the `next_obs` of the env's previous transition, or the first obs of a new episode.
        """
        stacked = np.stack([self._check_obs(obs, (), "obs"), self._check_obs(next_obs, (), "next_obs")])
        pair = self._to_frames(stacked, starts_episode=False)
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action: expected shape ({self.action_dim},), got {action.shape}")
        episode = self._open.get(env)
        if episode is None:
            first = self._to_frames(stacked[:1], starts_episode=True)[0].copy()
            episode = self._open[env] = {"frames": [first], "actions": [], "rewards": [], "flags": []}
        elif not np.array_equal(pair[0], episode["frames"][-1]):
            raise ValueError(
                f"env {env}: obs does not continue the open episode (it differs from the previous next_obs); "
                "for vector envs with NEXT_STEP autoreset use add_batch"
            )
        episode["frames"].append(pair[1].copy())  # a copy, so the stacks it came from are freed
        episode["actions"].append(action)
        episode["rewards"].append(float(reward))
        episode["flags"].append((bool(terminated), bool(truncated)))
        if terminated or truncated:
            self._close(env)

    def add_batch(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        autoreset: str = "next_step",
    ) -> None:
        """Stream one step of a vector env: row i of each argument is env i.

        With Gymnasium's default "next_step" autoreset, the step after an env's episode ends only resets that
        env (its action is ignored and it returns the reset obs), so that env's row is skipped. With
        "same_step", pass the true final observations (info["final_obs"]) as `next_obs` where an episode ended.
        """
        if autoreset not in ("next_step", "same_step", "disabled"):
            raise ValueError(f"autoreset={autoreset!r}: expected 'next_step', 'same_step' or 'disabled'")
        for i in range(len(obs)):
            if autoreset == "next_step" and i in self._after_done:
                self._after_done.discard(i)
                continue
            self.add(obs[i], actions[i], rewards[i], next_obs[i], terminated[i], truncated[i], env=i)
            if terminated[i] or truncated[i]:
                self._after_done.add(i)

    def _close(self, env: int) -> None:
        episode = self._open.pop(env)
        flags = np.array(episode["flags"], dtype=bool).reshape(-1, 2)
        self._store(
            np.stack(episode["frames"]),
            np.stack(episode["actions"]),
            np.array(episode["rewards"], np.float32),
            flags[:, 0],
            flags[:, 1],
        )

    def _check_obs(self, obs: np.ndarray, lead: tuple[int, ...], name: str) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape != (*lead, *self.obs_shape):
            raise ValueError(f"{name}: expected shape {(*lead, *self.obs_shape)}, got {obs.shape}")
        if not _castable(obs.dtype, self.obs_dtype):
            raise ValueError(f"{name}: dtype {obs.dtype} cannot be stored as {self.obs_dtype} without loss")
        return obs.astype(self.obs_dtype, copy=False)

    def _to_frames(self, obs: np.ndarray, starts_episode: bool) -> np.ndarray:
        """The newest frame of each stack in obs [N, S, ...], checking the stacks are consecutive."""
        if self.frame_stack == 1:
            return obs
        if starts_episode and not np.all(obs[0] == obs[0, -1:]):
            raise ValueError(
                "the first observation of an episode must repeat its reset frame across the stack "
                "(FrameStackObservation with padding_type='reset', the default)"
            )
        chunk = max(1, (1 << 24) // max(1, obs[0].nbytes))
        for start in range(1, len(obs), chunk):
            stop = min(len(obs), start + chunk)
            if not np.array_equal(obs[start:stop, :-1], obs[start - 1 : stop - 1, 1:]):
                raise ValueError("observations are not consecutive frame stacks (each stack must shift by one frame)")
        return obs[:, -1]

    def truncate_open(self) -> None:
        """Store the episodes still streaming in, marked truncated at their last step (collection stopped there)."""
        for env in sorted(self._open):
            episode = self._open[env]
            if episode["actions"]:
                episode["flags"][-1] = (episode["flags"][-1][0], True)
                self._close(env)
        self.discard_open()

    def discard_open(self) -> None:
        """Drop episodes still being streamed in (e.g. when a resumed run restarts its environments)."""
        self._open: dict[int, dict[str, list]] = {}  # episodes being streamed in, by env index
        self._after_done: set[int] = set()  # envs whose next vector step is a NEXT_STEP autoreset
