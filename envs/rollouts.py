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
    policy: Policy,
    env: gym.Env,
    *,
    seed: Optional[int] = None,
    options: Optional[dict[str, Any]] = None,
    max_steps: Optional[int] = None,
) -> tuple[float, np.ndarray, int, bool]:
    """One episode of `policy` in `env`, cut after `max_steps` steps when given; returns (return, start
    observation, steps, whether it ended by truncation or the cut rather than by termination)."""
    if not callable(policy):
        raise TypeError(f"policy must be callable as policy(obs) -> action, got {type(policy).__name__}")
    obs, _ = env.reset(seed=seed, options=options)
    start = np.array(obs)
    if callable(getattr(policy, "reset", None)):
        policy.reset()
    total, steps, terminated, truncated = 0.0, 0, False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        steps += 1
        truncated = bool(truncated) or (max_steps is not None and steps >= max_steps and not terminated)
    return total, start, steps, bool(truncated and not terminated)


def episode_returns(policy: Policy, env: gym.Env, episodes: int, seed: int = 0) -> list[float]:
    """Returns of `episodes` episodes of `policy` in `env`, episode i reset with ``seed + i``."""
    _check_episodes(episodes)
    return [play(policy, env, seed=seed + i)[0] for i in range(episodes)]


def time_limit(env: gym.Env) -> Optional[int]:
    """The step limit `env` enforces: the tightest of its TimeLimit wrappers' and a model env's own
    `max_episode_steps`; None when it has neither."""
    limits, layer = [], env
    while layer is not None:
        if isinstance(layer, gym.wrappers.TimeLimit):
            limits.append(int(layer._max_episode_steps))  # TimeLimit keeps its limit there
        elif layer is env.unwrapped and getattr(layer, "max_episode_steps", None) is not None:
            limits.append(int(layer.max_episode_steps))
        layer = getattr(layer, "env", None)
    return min(limits) if limits else None


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
    two returns differ only through the model's predictions. Where the real episode ran into its time limit,
    the model episode is cut at the same step, so both sum the same number of rewards; where it terminated, the
    model episode runs until the model predicts termination or reaches its own time limit, so a missed
    termination shows in the gap. A model environment without a time limit is refused: it could run forever.
    """
    _check_episodes(episodes)
    if time_limit(model_env) is None:
        raise ValueError(
            "model_env has no time limit (max_episode_steps=None and no TimeLimit wrapper), so an episode the model "
            "never ends would run forever: give it max_episode_steps or wrap it in gymnasium.wrappers.TimeLimit"
        )
    out = ValueGap([], [])
    for i in range(episodes):
        real_return, start, real_steps, cut = play(policy, real_env, seed=seed + i)
        model_return, _, model_steps, _ = play(
            policy, model_env, seed=seed + i, options={"obs": start}, max_steps=real_steps if cut else None
        )
        out.real.append(real_return)
        out.model.append(model_return)
        out.real_steps.append(real_steps)
        out.model_steps.append(model_steps)
    return out


def _check_episodes(episodes: int) -> None:
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
