"""Where imagined episodes start: real observations from a replay buffer, a dataset, an array, a sampler
or resets of the real environment, drawn with a caller's generator so a seed fixes every start."""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import gymnasium as gym
import numpy as np

from loopwm.replay import ReplayBuffer

Sampler = Callable[[np.random.Generator], np.ndarray]
StartSource = Union[None, Sampler, np.ndarray, ReplayBuffer, gym.Env, str, os.PathLike]


class Starts:
    """One start observation per `draw(rng)`, checked against the model's observation shape.

    Accepted sources:
    - a `ReplayBuffer`, or the path of a dataset it saved (`.npz`): a uniformly drawn stored observation
      that has a successor (MBPO-style branch starts, so any state the data visited);
    - an array ``[N, *obs_shape]`` (or one observation): a uniformly drawn row;
    - a `gymnasium.Env` with the model's spaces: ``env.reset(seed=...)``, seeded from the generator;
    - a callable ``f(rng) -> obs``;
    - None: no source; every reset must then pass its start observations.
    """

    def __init__(self, source: StartSource, obs_shape: tuple[int, ...]):
        self.obs_shape = tuple(obs_shape)
        self.owns_env = False  # set by whoever made the start environment for us, so `close` closes it
        if isinstance(source, (str, os.PathLike)):
            source = ReplayBuffer.load(source)
        if isinstance(source, ReplayBuffer):
            if tuple(source.obs_shape) != self.obs_shape:
                raise ValueError(
                    f"replay buffer holds observations of shape {tuple(source.obs_shape)}; the model "
                    f"expects {self.obs_shape}"
                )
            if source.num_episodes == 0:
                raise ValueError("replay buffer has no complete episode to draw start observations from")
        elif isinstance(source, gym.Env):
            space = source.observation_space
            if tuple(space.shape or ()) != self.obs_shape:
                raise ValueError(
                    f"start environment {source} has observations of shape {space.shape}; the model "
                    f"expects {self.obs_shape}"
                )
        elif source is not None and not callable(source):
            source = self._rows(source)
        self.source = source

    def _rows(self, data: object) -> np.ndarray:
        """An array of start observations (one observation becomes a set of one), checked."""
        data = np.asarray(data)
        if data.shape == self.obs_shape:
            data = data[None]
        if data.ndim != len(self.obs_shape) + 1 or tuple(data.shape[1:]) != self.obs_shape or len(data) == 0:
            raise ValueError(
                f"start observations have shape {data.shape}; expected (N, "
                f"{', '.join(map(str, self.obs_shape))}) with N >= 1, a ReplayBuffer, a dataset path, "
                "an environment or a callable f(rng) -> obs"
            )
        check_obs(data, self.obs_shape, "start observations", batched=True)
        return data

    @property
    def empty(self) -> bool:
        return self.source is None

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One start observation, drawn with `rng`."""
        source = self.source
        if source is None:
            raise ValueError(
                "no start observations: pass reset_obs=... (a ReplayBuffer, a dataset path, an array, "
                "an environment or a callable) or reset(options={'obs': ...})"
            )
        if isinstance(source, ReplayBuffer):
            obs = source.sample(1, 1, rng)["obs"][0, 0].numpy()
        elif isinstance(source, gym.Env):
            obs = source.reset(seed=int(rng.integers(2**31)))[0]
        elif callable(source):
            obs = np.asarray(source(rng))
        else:
            obs = source[int(rng.integers(len(source)))]
        return check_obs(obs, self.obs_shape, "start observation")

    def close(self) -> None:
        """Close the start environment if it was made for this source (a caller's own env stays open)."""
        if self.owns_env and isinstance(self.source, gym.Env):
            self.source.close()


def check_obs(
    obs: object, shape: tuple[int, ...], what: str, *, batched: bool = False, rows: Optional[int] = None
) -> np.ndarray:
    """`obs` as an array of `shape` (with a leading batch dimension when `batched`, of `rows` rows when given)
    holding finite numbers, or a ValueError that says what was wrong."""
    obs = np.asarray(obs)
    lead = () if not batched else (obs.shape[:1] if rows is None else (rows,))
    expected = (*lead, *shape)
    if obs.shape != expected:
        raise ValueError(f"{what} has shape {obs.shape}; expected {expected}")
    if not np.issubdtype(obs.dtype, np.number) or np.issubdtype(obs.dtype, np.complexfloating):
        raise ValueError(f"{what} must hold real numbers, got dtype {obs.dtype}")
    if not np.all(np.isfinite(obs)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return obs
