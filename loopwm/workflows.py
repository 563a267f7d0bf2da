"""What the CLI's `collect`, `train` and `eval` do, as functions (they sit on top with the CLI).

Run folders: `runs/<name>/` holds the resolved `config.yaml`, TensorBoard events, `metrics.jsonl`,
`checkpoints/latest.pt` (resumable) and `eval.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from loopwm.config import Config, ConfigError, dump_yaml
from loopwm.loop import LoopOptions
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / cfg.name


def prepare_run_dir(cfg: Config, checkpoint: Path) -> Path:
    """Create the run folder; refuse to overwrite a run that has a checkpoint unless resuming, or to start
    on a device this machine lacks."""
    from loopwm.logger import require_wandb
    from loopwm.train import resolve_device

    resolve_device(cfg.device)
    if cfg.wandb:
        require_wandb()
    folder = run_dir(cfg)
    if checkpoint.exists() and not cfg.resume:
        raise ConfigError(
            f"run folder {str(folder)!r} already has {checkpoint.name}: pass resume=true to continue it, "
            f"or choose another name=...")
    folder.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, folder / "config.yaml")
    return folder


def env_spaces(cfg: Config) -> tuple[Any, Any]:
    """The observation and action spaces of the configured environment."""
    from loopwm.envs.factory import make_env

    env = make_env(cfg.env, cfg.seed)
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def new_buffer(cfg: Config, obs_space: Any, act_space: Any) -> ReplayBuffer:
    from loopwm.envs.factory import action_dim

    return ReplayBuffer(obs_space.shape, action_dim(act_space), cfg.data.capacity, obs_space.dtype,
                        frame_stack=cfg.env.atari.frame_stack if cfg.env.id.startswith("ALE/") else 1)


def collect(cfg: Config, progress: bool = True) -> ReplayBuffer:
    """Fill a dataset with at least `data.steps` transitions from vectorised envs and save it to `data.path`.

    Episodes still running when the count is reached are stored as truncated there.
    """
    from tqdm.auto import tqdm

    from loopwm.envs.factory import action_from_model, action_to_model, make_vector_env

    envs = make_vector_env(cfg.env, cfg.seed)
    space = envs.single_action_space
    buffer = new_buffer(cfg, envs.single_observation_space, space)
    planner = _noisy_planner(cfg) if cfg.data.policy != "random" else None
    rng = np.random.default_rng(cfg.seed)
    obs, _ = envs.reset(seed=cfg.seed)
    starts = np.ones(cfg.env.num_envs, dtype=bool)     # obs is the first of an episode: plan from scratch
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


def _noisy_planner(cfg: Config):
    from loopwm.agents.planner import build_planner
    from loopwm.checkpoint import load

    if not cfg.data.planner_checkpoint:
        raise ConfigError(f"data.policy={cfg.data.policy!r} needs data.planner_checkpoint=PATH of a trained model")
    return build_planner(cfg, load(cfg.data.planner_checkpoint), seed=cfg.seed)


def _planned(planner, obs: np.ndarray, starts: np.ndarray, space: Any, noise: float,
             rng: np.random.Generator) -> np.ndarray:
    """Planner actions with Gaussian noise (Box) or ε-random actions (Discrete), in model units."""
    from loopwm.agents.online import random_model_actions

    action = planner.model_action(obs, t0=starts, batched=True)
    if planner.wm.discrete:
        flip = rng.random(len(action)) < noise
        return np.where(flip[:, None], random_model_actions(planner.wm, rng, len(action)), action)
    return np.clip(action + noise * rng.standard_normal(action.shape), -1, 1).astype(np.float32)


def load_dataset(cfg: Config) -> tuple[ReplayBuffer, ReplayBuffer]:
    """The dataset at `data.path`, split by whole episodes into train and held-out parts."""
    path = Path(cfg.data.path)
    if not path.is_file():
        raise ConfigError(f"data.path={str(path)!r} does not exist: run `loopwm collect` first")
    return ReplayBuffer.load(path).split(cfg.train.val_fraction, seed=cfg.seed)


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Fit a world model on the dataset, checkpoint it, and report held-out prediction errors."""
    from loopwm.evaluate import format_table, prediction_errors
    from loopwm.logger import RunLogger
    from loopwm.train import StopSignal, Trainer, restore_run, resolve_device, save_run, seed_everything

    seed_everything(cfg.seed, cfg.threads)
    latest = run_dir(cfg) / "checkpoints" / "latest.pt"
    folder = prepare_run_dir(cfg, latest)
    train_data, val_data = load_dataset(cfg)
    wm = WorldModel.from_config(cfg, *env_spaces(cfg)).to(resolve_device(cfg.device))
    stats = train_data.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    logger = RunLogger.for_config(folder, cfg)
    trainer = Trainer(wm, cfg, train_data, logger)
    if cfg.resume and latest.exists():
        restore_run(latest, trainer)
        logger.rewind(trainer.updates)
    with StopSignal() as stop:
        try:
            trainer.fit(progress=progress, on_checkpoint=lambda: save_run(latest, trainer), stop=stop)
        finally:
            logger.close()
        stop.exit_if_received()
    result = prediction_errors(wm, val_data, seed=cfg.seed, obs_mean=stats["obs_mean"],
                               obs_var=stats["obs_std"].pow(2))
    (folder / "eval.json").write_text(json.dumps(result, indent=2))
    if progress:
        print(format_table(result))
    return result


def evaluate_checkpoint(path: str | Path, data: Optional[str] = None, exit: Optional[str] = None,
                        horizons: tuple[int, ...] = (1, 10, 50)) -> dict[str, Any]:
    """Held-out prediction errors of a saved model, on its own dataset split or on `data`."""
    from loopwm.checkpoint import config_from_payload, model_from_payload, read_checkpoint
    from loopwm.evaluate import prediction_errors

    payload = read_checkpoint(path)
    wm = model_from_payload(payload, path)
    cfg = config_from_payload(payload, path) or Config()
    if data is not None:
        held_out = ReplayBuffer.load(data)
    else:
        _, held_out = load_dataset(cfg)
    options = LoopOptions.from_config(wm.cfg, exit=exit) if exit else None
    # vector models carry their training statistics; frames are normalised from the held-out data
    norm = {} if wm.spec.pixels else {"obs_mean": wm.obs_mean, "obs_var": wm.obs_std.pow(2)}
    return prediction_errors(wm, held_out, horizons, seed=cfg.seed, **norm, options=options)
