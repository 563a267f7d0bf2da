"""`loopwm collect`: fill a dataset (`data.path`, .npz) from vectorised envs with a random or noisy-planner policy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from loopwm.agents.online import random_model_actions
from loopwm.agents.planner import Planner, build_planner
from loopwm.checkpoint import load_run
from loopwm.config import Config, ConfigError
from loopwm.envs.factory import action_from_model, action_to_model, make_vector_env, replay_buffer
from loopwm.replay import ReplayBuffer


def collect(cfg: Config, progress: bool = True, overwrite: bool = False) -> ReplayBuffer:
    """Fill a dataset with at least `data.steps` transitions from vectorised envs and save it to `data.path`.

    Episodes still running when the count is reached are stored as truncated there. An existing file is
    replaced only with `overwrite=True`: a dataset that runs were trained on is never lost by accident.
    """
    from tqdm.auto import tqdm

    path = Path(cfg.data.path)
    if not cfg.data.path.strip() or path.is_dir():
        raise ConfigError(f"data.path={cfg.data.path!r}: expected the path of the .npz file to write")
    if path.is_file() and not overwrite:
        raise ConfigError(
            f"data.path={cfg.data.path!r} exists already; pass --overwrite (overwrite=True from Python) to replace "
            "it (runs trained on it then refuse to evaluate or resume on the new file), or choose another data.path"
        )
    if path.parent.exists() and not os.access(path.parent, os.W_OK):
        raise ConfigError(f"data.path={cfg.data.path!r}: its folder {str(path.parent)!r} is not writable")
    if cfg.data.capacity < cfg.data.steps:
        raise ConfigError(
            f"data.capacity={cfg.data.capacity} < data.steps={cfg.data.steps}: the buffer would evict old episodes "
            "and never hold data.steps transitions; raise data.capacity or lower data.steps"
        )
    planner = _noisy_planner(cfg) if cfg.data.policy != "random" else None
    envs = make_vector_env(cfg.env, cfg.seed)
    space = envs.single_action_space
    buffer = replay_buffer(cfg, envs.single_observation_space, space)
    rng = np.random.default_rng(cfg.seed)
    obs, _ = envs.reset(seed=cfg.seed)
    starts = np.ones(cfg.env.num_envs, dtype=bool)  # obs is the first of an episode: plan from scratch
    resetting = np.zeros(cfg.env.num_envs, dtype=bool)  # this step only resets the env (NEXT_STEP autoreset)
    bar = tqdm(total=cfg.data.steps, disable=not progress, desc="collect", dynamic_ncols=True)
    while (count := len(buffer) + buffer.open_transitions) < cfg.data.steps:
        use_planner = planner is not None and (cfg.data.policy == "noisy_planner" or count >= cfg.data.steps // 2)
        if use_planner:
            model_action = _planned(planner, obs, starts, space, cfg.data.noise, rng)
        else:
            model_action = action_to_model(envs.action_space.sample(), space)
        next_obs, reward, terminated, truncated, _ = envs.step(action_from_model(model_action, space))
        buffer.add_batch(obs, model_action, reward, next_obs, terminated, truncated)
        starts, resetting = resetting, terminated | truncated
        obs = next_obs
        bar.update(len(buffer) + buffer.open_transitions - bar.n)
    bar.close()
    envs.close()
    buffer.truncate_open()
    buffer.save(cfg.data.path)
    return buffer


def _noisy_planner(cfg: Config) -> Planner:
    """The planner of the model at `data.planner_checkpoint`, for the noisy-planner policies."""
    if not cfg.data.planner_checkpoint:
        raise ConfigError(f"data.policy={cfg.data.policy!r} needs data.planner_checkpoint=PATH of a trained model")
    return build_planner(cfg, load_run(cfg.data.planner_checkpoint).model, seed=cfg.seed)


def _planned(
    planner: Planner, obs: np.ndarray, starts: np.ndarray, space: Any, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Planner actions with Gaussian noise (Box) or ε-random actions (Discrete), in model units."""
    action = planner.model_action(obs, t0=starts, batched=True)
    if planner.wm.discrete:
        flip = rng.random(len(action)) < noise
        return np.where(flip[:, None], random_model_actions(planner.wm, rng, len(action)), action)
    return np.clip(action + noise * rng.standard_normal(action.shape), -1, 1).astype(np.float32)
