"""Gymnasium side of loopwm: environment factory, wrappers and the model environments.

Importing it registers `loopwm/WorldModel-v0` with Gymnasium. `SB3VecEnv` (the stable-baselines3
adapter) is imported on first use, so stable-baselines3 stays optional.
"""

from typing import Any

from loopwm.envs.factory import (
    action_dim,
    action_from_model,
    action_to_model,
    check_spaces,
    env_spaces,
    make_env,
    make_vector_env,
    replay_buffer,
)
from loopwm.envs.families import FAMILIES, EnvFamily, ReplayLayout, family_of
from loopwm.envs.registration import ENV_ID, make_vector_world_model_env, make_world_model_env, register
from loopwm.envs.rollouts import Policy, ValueGap, episode_returns, value_gap
from loopwm.envs.starts import Starts
from loopwm.envs.vector_world_model_env import VectorWorldModelEnv
from loopwm.envs.world_model_env import WorldModelEnv
from loopwm.envs.wrappers import ActionRepeat

register()


def __getattr__(name: str) -> Any:
    if name == "SB3VecEnv":
        from loopwm.envs.sb3 import SB3VecEnv

        return SB3VecEnv
    raise AttributeError(f"module 'loopwm.envs' has no attribute {name!r}")


__all__ = [
    "ENV_ID",
    "FAMILIES",
    "ActionRepeat",
    "EnvFamily",
    "Policy",
    "ReplayLayout",
    "SB3VecEnv",
    "Starts",
    "ValueGap",
    "VectorWorldModelEnv",
    "WorldModelEnv",
    "action_dim",
    "action_from_model",
    "action_to_model",
    "check_spaces",
    "env_spaces",
    "episode_returns",
    "family_of",
    "make_env",
    "make_vector_env",
    "make_vector_world_model_env",
    "make_world_model_env",
    "register",
    "replay_buffer",
    "value_gap",
]
