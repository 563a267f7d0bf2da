"""Gymnasium wrappers used by the environment factory."""
from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
from gymnasium.core import ActType, ObsType


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
