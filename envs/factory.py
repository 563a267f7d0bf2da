"""Build seeded Gymnasium environments from an `EnvConfig`, and map actions to and from the world model.

Which family builds an id (classic control, MuJoCo v5, Atari `ALE/*-v5`) is decided in `envs.families`. The
world model sees Box observations and works in normalised actions: a Box action is scaled to [-1, 1], a
Discrete action is one-hot.
"""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box, Dict, Discrete, MultiBinary, MultiDiscrete, Space

from loopwm.config import Config, ConfigError, EnvConfig, ModelConfig
from loopwm.envs.families import family_of
from loopwm.envs.wrappers import ActionRepeat, FlattenDictObservation
from loopwm.nets import SpaceSpec
from loopwm.replay import ReplayBuffer


def make_env(
    cfg: EnvConfig, seed: int | None = None, *, render_mode: str | None = None, training: bool = True
) -> gym.Env:
    """Make one wrapped environment; with a seed, its first reset and its spaces are seeded.

    Float64 observations (MuJoCo) are cast to float32, the dtype the world model trains in.
    `cfg.max_episode_steps` counts environment steps before action repeat (for Atari, after frame skip).
    Reward clipping applies to Atari only, and only when `training` is true.
    """
    env = family_of(cfg.id).make(cfg, render_mode, training)
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


def make_vector_env(
    cfg: EnvConfig,
    seed: int | None = None,
    *,
    training: bool = True,
    autoreset: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
) -> gym.vector.VectorEnv:
    """`cfg.num_envs` copies of `make_env` in a Sync/AsyncVectorEnv; sub-env i is seeded with seed + i.

    Autoreset defaults to Gymnasium's NEXT_STEP mode, which `ReplayBuffer.add_batch` expects by default
    (the online loop's `VectorCollector` disables it and resets episodes itself).
    """
    fns = [partial(make_env, cfg, None if seed is None else seed + i, training=training) for i in range(cfg.num_envs)]
    vector_cls = gym.vector.SyncVectorEnv if cfg.vectorization == "sync" else gym.vector.AsyncVectorEnv
    envs = vector_cls(fns, autoreset_mode=autoreset)
    if seed is not None:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        envs.observation_space.seed(seed)
    return envs


def env_spaces(cfg: EnvConfig, seed: int | None = None) -> tuple[Space, Space]:
    """The observation and action spaces of the configured environment (built once, then closed)."""
    env = make_env(cfg, seed)
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def replay_buffer(cfg: Config, obs_space: Space, act_space: Space) -> ReplayBuffer:
    """An empty replay buffer of `data.capacity` transitions, laid out as the env's family needs."""
    layout = family_of(cfg.env.id).layout(cfg.env)
    return ReplayBuffer(
        obs_space.shape, action_dim(act_space), cfg.data.capacity, obs_space.dtype, frame_stack=layout.frame_stack
    )


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


def check_model_fits(model: ModelConfig, obs_space: Space, act_space: Space, env_id: str) -> None:
    """Raise a ConfigError naming the setting that fixes it when `model` cannot read `env_id`'s observations
    (an MLP encoder or a delta decoder with frames, a CNN encoder with vectors); checked before a run writes."""
    spec = SpaceSpec.from_spaces(obs_space, act_space)
    frames = spec.pixels or any(is_frame for _, _, is_frame in spec.obs_parts)
    what = f"{env_id} gives {'frames' if spec.pixels else 'observations'} of shape {tuple(spec.obs_shape)}"
    fixes = []
    if model.encoder == "mlp" and spec.pixels:
        fixes.append("model.encoder='mlp' reads vectors: set model.encoder=auto (a CNN for frames)")
    if model.encoder == "cnn" and not spec.pixels and not spec.obs_parts:
        fixes.append("model.encoder='cnn' reads (C, H, W) frames: set model.encoder=auto (an MLP for vectors)")
    if model.obs_decoder == "delta" and frames:
        fixes.append("model.obs_decoder='delta' predicts changes of vectors: set model.obs_decoder=absolute")
    if fixes:
        raise ConfigError(f"{what}, but {'; '.join(fixes)}")


def agent_step_limit(cfg: EnvConfig, env_steps: int | None = None) -> int | None:
    """An episode's step limit in agent steps: `env_steps` (a real env's own limit), else `cfg.max_episode_steps`,
    else the registered one, each counted in environment steps and so divided by `cfg.action_repeat`, rounded up."""
    limit = env_steps or cfg.max_episode_steps
    if limit is None and cfg.id in gym.registry:
        limit = gym.spec(cfg.id).max_episode_steps
    return -(-limit // cfg.action_repeat) if limit else None


def check_episode_limit(cfg: Config) -> None:
    """Raise a ConfigError, before a run writes, when the env's time limit (`env.max_episode_steps`, else the
    registered one; in agent steps, after action repeat) is shorter than the training sequences
    (`train.horizon`) or longer than the replay can hold (`data.capacity`): either would only fail mid-run."""
    steps = agent_step_limit(cfg.env)
    if steps is None:
        return
    where = f"{cfg.env.id} episodes end after at most {steps} agent steps"
    if cfg.train.horizon > steps:
        raise ConfigError(
            f"{where}, but train.horizon={cfg.train.horizon} samples sequences of {cfg.train.horizon} steps "
            f"within one episode: set train.horizon to at most {steps}"
        )
    if cfg.data.capacity < steps:
        raise ConfigError(
            f"{where}, but data.capacity={cfg.data.capacity} cannot hold one: set data.capacity to at least {steps}"
        )


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


def action_starts(space: Space) -> np.ndarray:
    """The smallest value of each categorical sub-action (Discrete and MultiDiscrete may start above 0)."""
    if isinstance(space, (Discrete, MultiDiscrete)):
        return np.asarray(space.start, dtype=np.int64).ravel()
    return np.zeros(space.shape, dtype=np.int64)


def action_to_model(action: np.ndarray, space: Space) -> np.ndarray:
    """Env actions (batched or not) to model actions: Box scaled to [-1, 1], categorical as one-hots; float32."""
    groups = action_groups(space)
    if groups:
        index = np.asarray(action, dtype=np.int64)
        index = (index[..., None] if isinstance(space, Discrete) else index) - action_starts(space)
        return np.concatenate([np.eye(n, dtype=np.float32)[index[..., i]] for i, n in enumerate(groups)], -1)
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return (2.0 * (np.asarray(action, dtype=np.float64) - low) / (high - low) - 1.0).astype(np.float32)


def action_from_model(x: np.ndarray, space: Space) -> np.ndarray:
    """Model actions back to env actions: clip to [-1, 1] and rescale, or the argmax of each one-hot group."""
    groups = action_groups(space)
    x = np.asarray(x)
    if groups:
        ends = np.cumsum(groups)
        index = np.stack([np.argmax(x[..., e - n : e], axis=-1) for n, e in zip(groups, ends)], -1)
        index = index + action_starts(space)
        return (index[..., 0] if isinstance(space, Discrete) else index).astype(space.dtype)
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    unit = (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    return np.clip(low + unit * (high - low), low, high).astype(space.dtype)
