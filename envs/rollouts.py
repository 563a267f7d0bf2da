"""The policy protocol, and running one policy in the real environment and inside the model side by side.

A policy is any callable ``policy(obs) -> action`` that takes one observation and returns one action in
the environment's own units (a loaded loopwm agent, a stable-baselines3 model's ``predict`` wrapped in
a lambda, a hand-written controller). If it has a ``reset()`` method, that is called at every episode
start. `value_gap` plays it from the same start observations in both environments: the difference of
the returns is the model's error as that policy experiences it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np


@runtime_checkable
class Policy(Protocol):
    """``policy(obs) -> action`` for one observation, the action in the environment's units."""

    def __call__(self, obs: np.ndarray) -> Any: ...


def play(
    policy: Policy, env: gym.Env, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None
) -> tuple[float, np.ndarray, int]:
    """One episode of `policy` in `env`; returns (return, start observation, steps)."""
    if not callable(policy):
        raise TypeError(f"policy must be callable as policy(obs) -> action, got {type(policy).__name__}")
    obs, _ = env.reset(seed=seed, options=options)
    start = np.array(obs)
    if callable(getattr(policy, "reset", None)):
        policy.reset()
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        steps += 1
        done = bool(terminated or truncated)
    return total, start, steps


def episode_returns(policy: Policy, env: gym.Env, episodes: int, seed: int = 0) -> list[float]:
    """Returns of `episodes` episodes of `policy` in `env`, episode i reset with ``seed + i``."""
    _check_episodes(episodes)
    return [play(policy, env, seed=seed + i)[0] for i in range(episodes)]


@dataclass
class ValueGap:
    """Returns of one policy in the real environment and in the model, episode by episode."""

    real: list[float]
    model: list[float]
    real_steps: list[int] = field(default_factory=list)
    model_steps: list[int] = field(default_factory=list)

    @property
    def real_mean(self) -> float:
        return float(np.mean(self.real))

    @property
    def model_mean(self) -> float:
        return float(np.mean(self.model))

    @property
    def gap(self) -> float:
        """Mean model return minus mean real return: how much the model flatters (> 0) the policy."""
        return self.model_mean - self.real_mean

    def summary(self) -> dict[str, Any]:
        """Plain data for JSON: both returns, their means and the gap."""
        return {
            "real": self.real,
            "model": self.model,
            "real_mean": self.real_mean,
            "model_mean": self.model_mean,
            "gap": self.gap,
            "real_steps": self.real_steps,
            "model_steps": self.model_steps,
        }


def value_gap(policy: Policy, real_env: gym.Env, model_env: gym.Env, episodes: int = 5, seed: int = 0) -> ValueGap:
    """Play `policy` for `episodes` episodes in `real_env` and in `model_env`, episode i from the same start.

    Episode i resets the real environment with ``seed + i`` and hands its start observation to the model
    environment as ``reset(seed=seed + i, options={"obs": start})`` (as `WorldModelEnv` accepts), so the
    two returns differ only through the model's predictions. Give both environments the same time limit.
    """
    _check_episodes(episodes)
    out = ValueGap([], [])
    for i in range(episodes):
        real_return, start, real_steps = play(policy, real_env, seed=seed + i)
        model_return, _, model_steps = play(policy, model_env, seed=seed + i, options={"obs": start})
        out.real.append(real_return)
        out.model.append(model_return)
        out.real_steps.append(real_steps)
        out.model_steps.append(model_steps)
    return out


def _check_episodes(episodes: int) -> None:
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
