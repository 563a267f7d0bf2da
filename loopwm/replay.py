"""Episode replay buffer that samples fixed-length, time-major sequences for world-model training.

Transition k of an episode is (o_k, a_k, r_k, o_{k+1}, terminated_k, truncated_k); an episode of T
transitions has T + 1 observations. Storage is flat: a ring of `capacity` transitions holding
(o_k, a_k, r_k, flags), plus one final observation o_T per episode, so the oldest whole episodes are
dropped when the ring is full. With `frame_stack > 1` observations arrive as stacks (S, H, W) but only
the newest frame of each step is stored; stacks are rebuilt on read, repeating the reset frame before
the episode start exactly as Gymnasium's FrameStackObservation (padding_type="reset", its default) does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt
import torch

from loopwm.replay_intake import EpisodeIntake
from loopwm.replay_io import (
    ARRAYS,
    FORMAT,
    VERSION,
    DataError,
    check_arrays,
    check_finite,
    check_layout,
    pack_open,
    read_layout,
    read_npz,
    unpack_open,
    write_npz,
)

_RING = ("obs", "actions", "rewards", "terminated", "truncated")


def _resize(array: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
    """A new array of `length` rows whose first rows are `array[rows]`."""
    out = np.empty((length, *array.shape[1:]), dtype=array.dtype)
    out[: len(rows)] = array[rows]
    return out


def _flat_index(rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, step) pairs enumerating steps 0..counts[i]-1 of each row, row after row."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(rows, counts), np.arange(int(counts.sum())) - np.repeat(offsets, counts)


class ReplayBuffer(EpisodeIntake):
    """Whole episodes of (obs, action, reward, terminated, truncated), sampled as sequences within an episode.

    `obs_shape` is the environment's observation shape (the stack (S, ...) when `frame_stack` = S > 1);
    actions are the model's float vectors of width `action_dim`; `capacity` counts transitions. Episodes enter
    through `add_episode`, `add` and `add_batch` (loopwm.replay_intake).
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        capacity: int,
        obs_dtype: npt.DTypeLike = np.float32,
        frame_stack: int = 1,
    ):
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.action_dim = int(action_dim)
        self.capacity = int(capacity)
        self.obs_dtype = np.dtype(obs_dtype)
        self.frame_stack = int(frame_stack)
        if self.capacity < 1 or self.action_dim < 1 or self.frame_stack < 1:
            raise ValueError(
                f"ReplayBuffer: capacity={capacity}, action_dim={action_dim} and frame_stack={frame_stack} must be >= 1"
            )
        if self.frame_stack > 1 and (not self.obs_shape or self.obs_shape[0] != self.frame_stack):
            raise ValueError(
                f"ReplayBuffer: obs_shape={self.obs_shape} must start with the stack size frame_stack={frame_stack}"
            )
        self._frame_shape = self.obs_shape[1:] if self.frame_stack > 1 else self.obs_shape
        self._clear()

    def _clear(self) -> None:
        """Empty the storage; arrays grow on demand up to `capacity` rows."""
        frame = (0, *self._frame_shape)
        self._ring = {
            "obs": np.empty(frame, self.obs_dtype),
            "actions": np.empty((0, self.action_dim), np.float32),
            "rewards": np.empty(0, np.float32),
            "terminated": np.empty(0, bool),
            "truncated": np.empty(0, bool),
        }
        self._head, self._size = 0, 0  # ring slot of the oldest transition; transitions stored
        # episode table, live rows [_ep_head, _ep_head + _ep_count): first ring slot, length, final obs o_T
        self._eps = {
            "slot": np.empty(0, np.int64),
            "length": np.empty(0, np.int64),
            "final": np.empty(frame, self.obs_dtype),
        }
        self._ep_head, self._ep_count = 0, 0
        self.discard_open()

    def __len__(self) -> int:
        return self._size

    @property
    def num_episodes(self) -> int:
        """Number of complete episodes stored (episodes still being streamed in are not counted)."""
        return self._ep_count

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage arrays."""
        return sum(a.nbytes for a in (*self._ring.values(), *self._eps.values()))

    def _store(
        self,
        frames: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        """Append one episode given as frames [T+1, ...], evicting the oldest episodes to make room."""
        steps = len(actions)
        if not 1 <= steps <= self.capacity:
            raise ValueError(f"an episode must have between 1 and capacity={self.capacity} transitions, got {steps}")
        while self._size + steps > self.capacity:  # drop the oldest episode
            oldest = int(self._eps["length"][self._ep_head])
            self._head = (self._head + oldest) % len(self._ring["rewards"])
            self._size -= oldest
            self._ep_head, self._ep_count = self._ep_head + 1, self._ep_count - 1
        if self._size + steps > len(self._ring["rewards"]):
            self._grow_ring(min(self.capacity, max(2 * len(self._ring["rewards"]), self._size + steps)))
        slots = (self._head + self._size + np.arange(steps)) % len(self._ring["rewards"])
        for key, value in zip(_RING, (frames[:-1], actions, rewards, terminated, truncated)):
            self._ring[key][slots] = value
        self._append_episode(int(slots[0]), steps, frames[-1])
        self._size += steps

    def _grow_ring(self, length: int) -> None:
        alloc = len(self._ring["rewards"])
        if alloc:
            live = self._live_rows()
            self._eps["slot"][live] = (self._eps["slot"][live] - self._head) % alloc
        order = (self._head + np.arange(self._size)) % max(alloc, 1)
        self._ring = {k: _resize(v, order, length) for k, v in self._ring.items()}
        self._head = 0

    def _append_episode(self, slot: int, length: int, final: np.ndarray) -> None:
        end = self._ep_head + self._ep_count
        if end == len(self._eps["length"]):
            rows, size = self._live_rows(), max(16, 2 * self._ep_count + 2)
            self._eps = {k: _resize(v, rows, size) for k, v in self._eps.items()}
            self._ep_head, end = 0, self._ep_count
        self._eps["slot"][end] = slot
        self._eps["length"][end] = length
        self._eps["final"][end] = final
        self._ep_count += 1

    def _live_rows(self) -> np.ndarray:
        return np.arange(self._ep_head, self._ep_head + self._ep_count)

    def _frames(self, rows: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Stored frame of o_step in episode `rows` (0 <= step <= T, broadcast together)."""
        rows, steps = np.broadcast_arrays(rows, steps)
        lengths = self._eps["length"][rows]
        slots = (self._eps["slot"][rows] + np.minimum(steps, lengths - 1)) % len(self._ring["rewards"])
        out = self._ring["obs"][slots]
        final = steps == lengths
        out[final] = self._eps["final"][rows[final]]
        return out

    def _obs(self, rows: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Observation o_step as the env returned it, rebuilding frame stacks."""
        if self.frame_stack == 1:
            return self._frames(rows, steps)
        window = np.maximum(np.asarray(steps)[..., None] + np.arange(1 - self.frame_stack, 1), 0)
        return self._frames(np.asarray(rows)[..., None], window)

    def _transitions(self, rows: np.ndarray, steps: np.ndarray) -> dict[str, np.ndarray]:
        slots = (self._eps["slot"][rows] + steps) % len(self._ring["rewards"])
        return {k: self._ring[k][slots] for k in _RING[1:]}

    def sample(self, batch_size: int, length: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Uniformly sample `batch_size` sequences of `length` transitions, each inside one episode.

        Returns time-major tensors: obs [L+1, B, *obs_shape], actions [L, B, A], rewards, terminated and
        truncated [L, B] (bool). Obs keep the stored dtype (uint8 pixels stay uint8). Episodes shorter than
        `length` are never sampled.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size={batch_size} and length={length} must be >= 1")
        rows = self._live_rows()
        lengths = self._eps["length"][rows]
        starts = np.maximum(lengths - length + 1, 0)
        total = int(starts.sum())
        if total == 0:
            raise ValueError(
                f"no stored episode has at least length={length} transitions ({self._ep_count} episodes, "
                f"longest {int(lengths.max(initial=0))}); collect more data or sample shorter sequences"
            )
        draw = rng.integers(total, size=batch_size)
        ends = np.cumsum(starts)
        episode = np.searchsorted(ends, draw, side="right")
        start = draw - (ends[episode] - starts[episode])
        steps = start[None, :] + np.arange(length + 1)[:, None]
        rows = rows[episode][None, :]
        batch = {"obs": self._obs(rows, steps), **self._transitions(rows, steps[:-1])}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def episodes(self) -> Iterator[dict[str, np.ndarray]]:
        """Stored episodes, oldest first: obs [T+1, *obs_shape] with stacks rebuilt, and the transitions."""
        for row in self._live_rows():
            steps = np.arange(int(self._eps["length"][row]) + 1)
            yield {"obs": self._obs(row, steps), **self._transitions(row, steps[:-1])}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.episodes()

    def _obs_chunks(self, chunk: int = 4096) -> Iterator[np.ndarray]:
        rows = self._live_rows()
        rows, steps = _flat_index(rows, self._eps["length"][rows] + 1)
        for start in range(0, len(rows), chunk):
            yield self._frames(rows[start : start + chunk], steps[start : start + chunk]).astype(np.float64)

    def stats(self) -> dict[str, torch.Tensor]:
        """Per-dimension mean and (population) std of all stored observations, and of rewards, for normalisation."""
        if not self._ep_count:
            raise ValueError("stats() needs at least one stored episode")
        count = self._size + self._ep_count
        mean = sum(x.sum(0) for x in self._obs_chunks()) / count
        std = np.sqrt(sum(((x - mean) ** 2).sum(0) for x in self._obs_chunks()) / count)
        rewards = self._ring["rewards"][(self._head + np.arange(self._size)) % len(self._ring["rewards"])]
        out = {
            "obs_mean": np.broadcast_to(mean, self.obs_shape),
            "obs_std": np.broadcast_to(std, self.obs_shape),
            "reward_mean": rewards.mean(dtype=np.float64),
            "reward_std": rewards.std(dtype=np.float64),
        }
        return {k: torch.tensor(np.asarray(v, np.float32)) for k, v in out.items()}

    def _arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Episodes `rows` as flat arrays: obs frames [sum(T+1), ...] and transitions [sum(T), ...]."""
        lengths = self._eps["length"][rows]
        return {
            "obs": self._frames(*_flat_index(rows, lengths + 1)),
            **self._transitions(*_flat_index(rows, lengths)),
            "episode_lengths": lengths.astype(np.int64),
        }

    def _load_arrays(self, arrays: dict[str, np.ndarray], source: str) -> None:
        """Replace the stored episodes by those in `arrays` (the layout of `_arrays`), validating it."""
        check_arrays(arrays, self._frame_shape, self.action_dim, self.obs_dtype, source)
        lengths = arrays["episode_lengths"]
        self._clear()
        obs_end, step_end = np.cumsum(lengths + 1), np.cumsum(lengths)
        try:
            for o1, t1, n in zip(obs_end, step_end, lengths):
                o0, t0 = o1 - n - 1, t1 - n
                self._store(arrays["obs"][o0:o1], *(arrays[k][t0:t1] for k in _RING[1:]))
        except ValueError as exc:  # an episode longer than the capacity, or broken frame stacks
            raise DataError(f"{source}: {exc}") from None

    def split(self, val_fraction: float, seed: int = 0) -> tuple["ReplayBuffer", "ReplayBuffer"]:
        """(train, val) buffers holding disjoint whole episodes; the same seed gives the same split.

        The validation buffer gets round(val_fraction * episodes) episodes, at least one when val_fraction > 0.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction}: expected a value in [0, 1)")
        if val_fraction > 0 and self._ep_count < 2:
            raise ValueError(f"split needs at least 2 episodes to hold some out, the buffer has {self._ep_count}")
        n_val = 0 if val_fraction == 0 else min(self._ep_count - 1, max(1, round(val_fraction * self._ep_count)))
        rows = self._live_rows()
        held_out = np.zeros(len(rows), bool)
        held_out[np.random.default_rng(seed).permutation(len(rows))[:n_val]] = True
        train, val = (self._from_meta(self._meta(), "split") for _ in range(2))
        train._load_arrays(self._arrays(rows[~held_out]), "split")
        val._load_arrays(self._arrays(rows[held_out]), "split")
        return train, val

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "obs_shape": list(self.obs_shape),
            "action_dim": self.action_dim,
            "capacity": self.capacity,
            "obs_dtype": self.obs_dtype.str,
            "frame_stack": self.frame_stack,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the stored episodes to an .npz file atomically (temp file, fsync, rename)."""
        write_npz(path, self._meta(), self._arrays(self._live_rows()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReplayBuffer":
        """Read a buffer written by `save`. A missing file raises FileNotFoundError; a corrupt, foreign or
        malformed one, or one holding NaN or inf observations, actions or rewards, raises a DataError naming
        the file and the field."""
        path = Path(path)
        source = f"replay file {str(path)!r}"
        meta, arrays = read_npz(path, source)
        buffer = cls._from_meta(meta, source)
        buffer._load_arrays(arrays, source)
        check_finite(arrays, source)
        return buffer

    @classmethod
    def _from_meta(cls, meta: Any, source: str) -> "ReplayBuffer":
        layout = read_layout(meta, source)
        try:
            return cls(**layout)
        except (ValueError, OverflowError) as exc:
            raise DataError(f"{source}: {exc}") from None

    def check_layout(self, obs_shape: tuple[int, ...], action_dim: int, *, source: str, expected_by: str) -> None:
        """Refuse data whose observations or actions do not fit a model or environment (`expected_by`):
        the observation shape and the action width must match, and actions must be in model units [-1, 1]."""
        actions = self._ring["actions"][(self._head + np.arange(self._size)) % max(len(self._ring["rewards"]), 1)]
        check_layout(
            (self.obs_shape, self.action_dim), actions, obs_shape, action_dim, source=source, expected_by=expected_by
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, including episodes still being streamed in; only tensors and plain types."""
        state: dict[str, Any] = self._meta()
        state.update({k: torch.from_numpy(v) for k, v in self._arrays(self._live_rows()).items()})
        state["open"] = pack_open(self._open)
        state["after_done"] = sorted(self._after_done)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the layout (shape, action width, dtype, stack) must match, capacity is kept."""
        other = self._from_meta(state, "replay state")
        for key in ("obs_shape", "action_dim", "obs_dtype", "frame_stack"):
            if getattr(other, key) != getattr(self, key):
                raise DataError(
                    f"replay state: {key}={getattr(other, key)} does not match this buffer's {getattr(self, key)}"
                )
        self._load_arrays({k: state[k].numpy() for k in ARRAYS}, "replay state")
        self._open = unpack_open(state["open"])
        self._after_done = set(state["after_done"])
