"""`loopwm/WorldModel-v0`: model environments built from a checkpoint by `gymnasium.make` and `make_vec`.

    env = gymnasium.make("loopwm/WorldModel-v0", checkpoint="runs/x/checkpoints/latest.pt")
    venv = gymnasium.make_vec("loopwm/WorldModel-v0", num_envs=1024, checkpoint=...)

The real environment is rebuilt from the checkpoint's config (or given as ``env``). It supplies the
observation bounds, the time limit and, unless ``reset_obs`` says otherwise, the start observations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np

from loopwm.checkpoint import load_run
from loopwm.config import EnvConfig
from loopwm.envs.factory import agent_step_limit, make_env
from loopwm.envs.model_io import check_compatible
from loopwm.envs.starts import StartSource
from loopwm.envs.vector_world_model_env import VectorWorldModelEnv
from loopwm.envs.world_model_env import WorldModelEnv
from loopwm.exits import LoopOptions
from loopwm.replay import ReplayBuffer
from loopwm.train import resolve_device
from loopwm.world_model import WorldModel

ENV_ID = "loopwm/WorldModel-v0"
RealEnv = Union[None, str, gym.Env]


def register() -> None:
    """Register `loopwm/WorldModel-v0` with Gymnasium (once; importing `loopwm.envs` does it)."""
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=make_world_model_env, vector_entry_point=make_vector_world_model_env)


def _replay_starts(payload: dict, path: str) -> ReplayBuffer:
    """The replay buffer saved in a run checkpoint, as a start source."""
    state = payload.get("replay")
    if state is None:
        raise ValueError(f"reset_obs='replay': checkpoint {path!r} holds no replay buffer (only run checkpoints do)")
    buffer = ReplayBuffer(
        state["obs_shape"], state["action_dim"], state["capacity"], np.dtype(state["obs_dtype"]), state["frame_stack"]
    )
    buffer.load_state_dict(state)
    return buffer


def real_env(env: RealEnv, cfg: Any) -> tuple[Optional[gym.Env], bool]:
    """The real environment a checkpoint stands for: `env` itself, made from its id (with the checkpoint's
    env config when the ids agree), or rebuilt from the config; and whether it was made here (so is closed here)."""
    if isinstance(env, gym.Env):
        return env, False
    if env is None and cfg is None:
        return None, False
    env_cfg = cfg.env if cfg is not None and (env is None or env == cfg.env.id) else EnvConfig(id=env)
    return make_env(env_cfg, training=False), True


def model_env_parts(
    checkpoint: Union[str, Path],
    env: RealEnv = None,
    reset_obs: Union[StartSource, str] = None,
    max_episode_steps: Optional[int] = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The model, spaces, start source and time limit that both registered environments are built from.

    A real environment whose spaces differ from the checkpoint's model raises a ValueError naming both.
    ``reset_obs="replay"`` starts episodes from the checkpoint's own replay buffer.
    """
    path = str(checkpoint)
    run = load_run(path)
    wm: WorldModel = run.model.to(resolve_device(device)).eval()
    cfg = run.config
    real, owned = real_env(env, cfg)
    if real is not None:
        try:
            check_compatible(
                wm.spec,
                real.observation_space,
                real.action_space,
                f"environment {real.spec.id if real.spec else real!s} (requested for {path!r})",
            )
        except ValueError:
            if owned:
                real.close()
            raise
    if isinstance(reset_obs, str) and reset_obs == "replay":
        reset_obs = _replay_starts(run.payload, path)
    if max_episode_steps is None:  # the real env's limit counts its own steps; one model step is action_repeat of them
        limit = real.spec.max_episode_steps if real is not None and real.spec is not None else None
        max_episode_steps = (agent_step_limit(cfg.env, limit) if cfg is not None else limit) or 1000
    parts = {
        "wm": wm,
        "reset_obs": reset_obs if reset_obs is not None else real,
        "observation_space": real.observation_space if real is not None else None,
        "action_space": real.action_space if real is not None else None,
        "max_episode_steps": max_episode_steps,
    }
    if owned and parts["reset_obs"] is not real:
        real.close()  # it gave its spaces and time limit; episodes start elsewhere
        owned = False
    parts["owns_env"] = owned
    return parts


def _finish(model_env: Union[WorldModelEnv, VectorWorldModelEnv], owns_env: bool) -> Any:
    model_env.starts.owns_env = owns_env
    return model_env


def make_world_model_env(
    checkpoint: Union[str, Path],
    *,
    env: RealEnv = None,
    reset_obs: Union[StartSource, str] = None,
    max_episode_steps: Optional[int] = None,
    decode_obs: bool = True,
    render_mode: Optional[str] = None,
    options: Optional[LoopOptions] = None,
    device: str = "cpu",
) -> WorldModelEnv:
    """`gymnasium.make("loopwm/WorldModel-v0", checkpoint=PATH, ...)`: a `WorldModelEnv` of a saved model.

    `gymnasium.make`'s own ``max_episode_steps`` adds a TimeLimit on top; the model env itself truncates
    where the real environment would.
    """
    parts = model_env_parts(checkpoint, env, reset_obs, max_episode_steps, device)
    owns = parts.pop("owns_env")
    return _finish(WorldModelEnv(**parts, decode_obs=decode_obs, render_mode=render_mode, options=options), owns)


def make_vector_world_model_env(
    checkpoint: Union[str, Path],
    num_envs: int = 1,
    *,
    env: RealEnv = None,
    reset_obs: Union[StartSource, str] = None,
    max_episode_steps: Optional[int] = None,
    decode_obs: bool = True,
    autoreset_mode: Any = gym.vector.AutoresetMode.NEXT_STEP,
    options: Optional[LoopOptions] = None,
    device: str = "cpu",
) -> VectorWorldModelEnv:
    """`gymnasium.make_vec("loopwm/WorldModel-v0", num_envs=N, checkpoint=PATH, ...)`: one batched model env."""
    parts = model_env_parts(checkpoint, env, reset_obs, max_episode_steps, device)
    owns = parts.pop("owns_env")
    return _finish(
        VectorWorldModelEnv(
            **parts, num_envs=num_envs, decode_obs=decode_obs, autoreset_mode=autoreset_mode, options=options
        ),
        owns,
    )


__all__ = ["ENV_ID", "real_env", "make_vector_world_model_env", "make_world_model_env", "model_env_parts", "register"]
