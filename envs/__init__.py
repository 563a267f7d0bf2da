"""Gymnasium side of loopwm: environment factory, wrappers and the world-model environment."""
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
from loopwm.envs.world_model_env import WorldModelEnv
from loopwm.envs.wrappers import ActionRepeat

__all__ = [
    "FAMILIES",
    "ActionRepeat",
    "EnvFamily",
    "ReplayLayout",
    "WorldModelEnv",
    "action_dim",
    "action_from_model",
    "action_to_model",
    "check_spaces",
    "env_spaces",
    "family_of",
    "make_env",
    "make_vector_env",
    "replay_buffer",
]
