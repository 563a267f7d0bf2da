"""Gymnasium side of loopwm: environment factory, wrappers and the world-model environment."""
from loopwm.envs.factory import (
    action_dim,
    action_from_model,
    action_to_model,
    check_spaces,
    make_env,
    make_vector_env,
)
from loopwm.envs.world_model_env import WorldModelEnv
from loopwm.envs.wrappers import ActionRepeat

__all__ = [
    "ActionRepeat",
    "WorldModelEnv",
    "action_dim",
    "action_from_model",
    "action_to_model",
    "check_spaces",
    "make_env",
    "make_vector_env",
]
