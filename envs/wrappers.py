"""Gymnasium wrappers used by the environment factory."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.core import ActType, ObsType
from gymnasium.spaces import Box, Dict


class ActionRepeat(gym.Wrapper[ObsType, ActType, ObsType, ActType], gym.utils.RecordConstructorArgs):
    """Repeats each action ``repeat`` times and sums the rewards, stopping early when the episode ends.

    The returned observation, flags and info are those of the last inner step.

    Example:
        >>> import gymnasium as gym
        >>> env = ActionRepeat(gym.make("Pendulum-v1"), repeat=2)
        >>> _ = env.reset(seed=0)
        >>> _, _, _, truncated, _ = env.step(env.action_space.sample())
    """

    def __init__(self, env: gym.Env[ObsType, ActType], repeat: int):
        """Wrap ``env`` so that one step applies the action ``repeat`` (>= 1) times."""
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"ActionRepeat: repeat must be an integer >= 1, got {repeat!r}")
        gym.utils.RecordConstructorArgs.__init__(self, repeat=repeat)
        gym.Wrapper.__init__(self, env)
        self.repeat = repeat

    def step(self, action: ActType) -> tuple[ObsType, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step ``repeat`` times (or until termination/truncation) and return the summed reward."""
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


class FlatDictBox(Box):
    """The Box of a flattened Dict observation; `dict_space` keeps the Dict, so the world model can give
    each key its own encoder (keys in sorted order, each part flattened in C order)."""

    def __init__(self, dict_space: Dict):
        keys = sorted(dict_space.spaces)
        low = np.concatenate([np.asarray(dict_space[k].low, np.float32).ravel() for k in keys])
        high = np.concatenate([np.asarray(dict_space[k].high, np.float32).ravel() for k in keys])
        super().__init__(low, high, dtype=np.float32)
        self.dict_space = dict_space

    def flatten(self, obs: dict[str, Any]) -> np.ndarray:
        """A Dict observation as one float32 vector in this layout."""
        return np.concatenate([np.asarray(obs[k], np.float32).ravel() for k in sorted(self.dict_space.spaces)])


class FlattenDictObservation(gym.ObservationWrapper[np.ndarray, ActType, dict], gym.utils.RecordConstructorArgs):
    """Turns a Dict observation of Boxes (say an image and a vector) into one float32 vector whose space,
    a `FlatDictBox`, remembers the parts. `make_env` applies it to every Dict-observation environment.
    """

    def __init__(self, env: gym.Env[dict, ActType]):
        """Wrap ``env``, whose observation space must be a Dict of Boxes."""
        if not isinstance(env.observation_space, Dict):
            raise ValueError(f"FlattenDictObservation needs a Dict observation space, got {env.observation_space}")
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = FlatDictBox(env.observation_space)

    def observation(self, observation: dict) -> np.ndarray:
        return self.observation_space.flatten(observation)
