"""Build seeded Gymnasium environments from an `EnvConfig`, and map actions to and from the world model.

Classic control, MuJoCo v5 and Atari (`ALE/*-v5`) are supported. The world model sees Box observations
and works in normalised actions: a Box action is scaled to [-1, 1], a Discrete action is one-hot.
"""
from __future__ import annotations

import difflib
import importlib
from functools import partial
from types import ModuleType

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec
from gymnasium.spaces import Box, Dict, Discrete, MultiBinary, MultiDiscrete, Space
from gymnasium.wrappers import (
    AtariPreprocessing,
    FrameStackObservation,
    TimeLimit,
    TransformObservation,
    TransformReward,
)

from loopwm.config import EnvConfig
from loopwm.envs.wrappers import ActionRepeat, FlattenDictObservation
from loopwm.nets import SpaceSpec


def _require(module: str, extra: str, env_id: str, what: str) -> ModuleType:
    """Import an optional dependency, or fail with the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{env_id} needs {what}: pip install 'loopwm[{extra}]' ({exc})") from exc


def _spec(env_id: str) -> EnvSpec:
    """Look up a registered environment, suggesting close ids when it is unknown."""
    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown environment id {env_id!r}{hint} ({exc})") from None


def _to_float32(obs: np.ndarray) -> np.ndarray:
    return obs.astype(np.float32)


def _make_atari(cfg: EnvConfig, render_mode: str | None, training: bool) -> gym.Env:
    """Atari with the standard preprocessing: no-op starts, frame skip, 84x84 grayscale, frame stack."""
    ale_py = _require("ale_py", "atari", cfg.id, "the Arcade Learning Environment")
    _require("cv2", "atari", cfg.id, "OpenCV")
    gym.register_envs(ale_py)
    _spec(cfg.id)
    env = gym.make(cfg.id, frameskip=1, repeat_action_probability=cfg.atari.sticky_actions, render_mode=render_mode)
    env = AtariPreprocessing(
        env,
        noop_max=30,
        frame_skip=cfg.atari.frame_skip,
        screen_size=cfg.atari.screen_size,
        terminal_on_life_loss=cfg.atari.terminal_on_life_loss,
        grayscale_obs=True,
    )
    if cfg.max_episode_steps is not None:
        env = TimeLimit(env, cfg.max_episode_steps)
    env = FrameStackObservation(env, cfg.atari.frame_stack)
    if training and cfg.atari.clip_rewards:
        env = TransformReward(env, np.sign)
    return env


def make_env(
    cfg: EnvConfig, seed: int | None = None, *, render_mode: str | None = None, training: bool = True
) -> gym.Env:
    """Make one wrapped environment; with a seed, its first reset and its spaces are seeded.

    Float64 observations (MuJoCo) are cast to float32, the dtype the world model trains in.
    `cfg.max_episode_steps` counts environment steps before action repeat (for Atari, after frame skip).
    Reward clipping applies to Atari only, and only when `training` is true.
    """
    if cfg.id.startswith("ALE/"):
        env = _make_atari(cfg, render_mode, training)
    else:
        if str(_spec(cfg.id).entry_point).startswith("gymnasium.envs.mujoco"):
            _require("mujoco", "mujoco", cfg.id, "MuJoCo")
        env = gym.make(cfg.id, render_mode=render_mode, max_episode_steps=cfg.max_episode_steps)
        space = env.observation_space
        if isinstance(space, Box) and space.dtype == np.float64:
            bounds = (space.low.astype(np.float32), space.high.astype(np.float32))
            env = TransformObservation(env, _to_float32, Box(*bounds, dtype=np.float32))
    try:
        check_spaces(env.observation_space, env.action_space)
    except ValueError:
        env.close()
        raise
    if isinstance(env.observation_space, Dict):
        env = FlattenDictObservation(env)
    if cfg.action_repeat > 1:
        env = ActionRepeat(env, cfg.action_repeat)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


def make_vector_env(cfg: EnvConfig, seed: int | None = None, *, training: bool = True) -> gym.vector.VectorEnv:
    """`cfg.num_envs` copies of `make_env` in a Sync/AsyncVectorEnv; sub-env i is seeded with seed + i.

    Autoreset is Gymnasium's NEXT_STEP mode, which `ReplayBuffer.add_batch` expects by default.
    """
    fns = [
        partial(make_env, cfg, None if seed is None else seed + i, training=training) for i in range(cfg.num_envs)
    ]
    vector_cls = gym.vector.SyncVectorEnv if cfg.vectorization == "sync" else gym.vector.AsyncVectorEnv
    envs = vector_cls(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    if seed is not None:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        envs.observation_space.seed(seed)
    return envs


def check_spaces(obs_space: Space, act_space: Space) -> None:
    """Raise a ValueError naming the space and what is supported when the world model cannot handle it.

    Observations: a Box of shape (d,) or (C, H, W), or a Dict of such Boxes (flattened by `make_env`).
    Actions: a 1-D Box with finite bounds (normalised to [-1, 1]), Discrete, MultiDiscrete or MultiBinary.
    """
    try:
        SpaceSpec.from_spaces(obs_space, act_space)
    except TypeError as exc:
        raise ValueError(f"{exc} (the world model's supported spaces)") from None
    if isinstance(act_space, Box) and np.any(act_space.high <= act_space.low):
        raise ValueError(f"action space {act_space} has a dimension with high <= low")


def action_groups(space: Space) -> tuple[int, ...]:
    """One-hot group sizes of a categorical action space, () for a Box; an unsupported space raises."""
    check_spaces(Box(-1.0, 1.0, (1,), np.float32), space)
    if isinstance(space, Discrete):
        return (int(space.n),)
    if isinstance(space, MultiDiscrete):
        return tuple(int(n) for n in space.nvec)
    if isinstance(space, MultiBinary):
        return (2,) * int(space.shape[0])
    return ()


def action_dim(space: Space) -> int:
    """Width of the model's action vector: the Box dimension, or the total size of the one-hot groups."""
    groups = action_groups(space)
    return sum(groups) if groups else int(space.shape[0])


def _starts(space: Space) -> np.ndarray:
    """The smallest value of each categorical sub-action (Discrete and MultiDiscrete may start above 0)."""
    if isinstance(space, (Discrete, MultiDiscrete)):
        return np.asarray(space.start, dtype=np.int64).ravel()
    return np.zeros(space.shape, dtype=np.int64)


def action_to_model(action: np.ndarray, space: Space) -> np.ndarray:
    """Env actions (batched or not) to model actions: Box scaled to [-1, 1], categorical as one-hots; float32."""
    groups = action_groups(space)
    if groups:
        index = np.asarray(action, dtype=np.int64)
        index = (index[..., None] if isinstance(space, Discrete) else index) - _starts(space)
        return np.concatenate([np.eye(n, dtype=np.float32)[index[..., i]] for i, n in enumerate(groups)], -1)
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return (2.0 * (np.asarray(action, dtype=np.float64) - low) / (high - low) - 1.0).astype(np.float32)


def action_from_model(x: np.ndarray, space: Space) -> np.ndarray:
    """Model actions back to env actions: clip to [-1, 1] and rescale, or the argmax of each one-hot group."""
    groups = action_groups(space)
    x = np.asarray(x)
    if groups:
        ends = np.cumsum(groups)
        index = np.stack([np.argmax(x[..., e - n:e], axis=-1) for n, e in zip(groups, ends)], -1) + _starts(space)
        return (index[..., 0] if isinstance(space, Discrete) else index).astype(space.dtype)
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    unit = (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    return np.clip(low + unit * (high - low), low, high).astype(space.dtype)
