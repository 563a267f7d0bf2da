"""`loopwm train`: fit a world model on a saved dataset in a run folder, then report held-out prediction errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from loopwm import distributed
from loopwm.analysis.prediction import format_table, prediction_errors
from loopwm.analysis.stats import to_json
from loopwm.app.session import RunSession, seed_everything
from loopwm.config import Config, ConfigError
from loopwm.envs.factory import check_model_fits, env_spaces
from loopwm.replay import ReplayBuffer
from loopwm.replay_io import file_digest
from loopwm.train import Trainer, resolve_device
from loopwm.world_model import WorldModel


def load_dataset(
    cfg: Config, wm: Optional[WorldModel] = None, expected_by: str = "the model"
) -> tuple[ReplayBuffer, ReplayBuffer]:
    """The dataset at `data.path` (checked against `wm`'s spaces when given), split by whole episodes into
    train and held-out parts."""
    path = Path(cfg.data.path)
    if not path.is_file():
        raise ConfigError(f"data.path={str(path)!r} does not exist: run `loopwm collect` first")
    return load_checked(path, wm, expected_by).split(cfg.train.val_fraction, seed=cfg.seed)


def load_checked(path: str | Path, wm: Optional[WorldModel], expected_by: str = "the model") -> ReplayBuffer:
    """`ReplayBuffer.load` (which refuses non-finite values), then the observation shape and action width
    that `wm` needs."""
    buffer = ReplayBuffer.load(path)
    if wm is not None:
        buffer.check_layout(
            wm.spec.obs_shape, wm.spec.action_dim, source=f"dataset {str(path)!r}", expected_by=expected_by
        )
    return buffer


def held_out_split(
    cfg: Config, wm: Optional[WorldModel] = None, kind: Optional[str] = "train", digest: Optional[str] = None
) -> ReplayBuffer:
    """The held-out episodes a `loopwm train` run was evaluated on. An online run (`kind="run"`) learnt from its
    own replay and a run trained on everything has none, so say so rather than split whatever `data.path` holds;
    and when the file no longer has the run's recorded `digest`, its split would hold other (maybe training)
    episodes, so that is refused too."""
    if kind == "run":
        raise ConfigError(
            "this is a `loopwm run` folder: the online run learnt from its own episodes and has no held-out split "
            f"(its data.path={cfg.data.path!r} is not its data): pass --data with a dataset it never saw"
        )
    if cfg.train.val_fraction == 0:
        raise ConfigError("the run was trained with train.val_fraction=0, so it has no held-out split: pass --data")
    held_out = load_dataset(cfg, wm)[1]
    if digest is not None and file_digest(cfg.data.path) != digest:
        raise ConfigError(
            f"data.path={cfg.data.path!r} has changed since the run trained on it (its SHA-256 differs), so its "
            "held-out split would hold other episodes, perhaps ones it trained on: restore the file, or pass --data"
        )
    return held_out


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Fit a world model on the dataset, checkpoint it, and report held-out prediction errors (written to
    eval.json). With `train.val_fraction=0` every episode trains and the held-out report is skipped ({}).

    Under `torchrun` every process trains its share of each batch (`loopwm.distributed`); rank 0 alone writes
    the run folder and evaluates."""
    with distributed.joined(resolve_device(cfg.device)) as device, RunSession(cfg, "train") as session:
        seed_everything(cfg.seed, cfg.threads)
        spaces = env_spaces(cfg.env, cfg.seed)
        check_model_fits(cfg.model, *spaces, cfg.env.id)
        wm = WorldModel.from_config(cfg, *spaces).to(device)
        train_data, val_data = load_dataset(cfg, wm, expected_by=f"the environment {cfg.env.id}")
        if cfg.train.val_fraction == 0 and session.main:
            print(
                "loopwm train: train.val_fraction=0 trains on every episode, so there is no held-out evaluation; "
                "evaluate on another dataset with `loopwm eval RUN --data FILE`",
                file=sys.stderr,
            )
        stats = train_data.stats()
        wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
        trainer = Trainer(wm, cfg, train_data, session.logger)
        digest = file_digest(cfg.data.path)  # so eval and analyze notice the file changing under the run
        saved = session.resumed.payload.get("dataset_sha256") if session.resumed is not None else None
        if saved is not None and saved != digest:
            raise ConfigError(
                f"data.path={cfg.data.path!r} has changed since this run trained on it (its SHA-256 differs): "
                "resuming would evaluate on another split; restore the file, or train a new run (another name=...)"
            )
        session.start(wm.spec)
        session.restore(trainer, log_step=lambda payload: payload["trainer"]["updates"])
        trainer.fit(
            progress=progress and session.main,
            on_checkpoint=lambda: session.save(trainer, dataset_sha256=digest),
            stop=session.stop,
        )
        session.stop.exit_if_received(f"at update {trainer.updates}; its checkpoint continues with resume=true")
        if cfg.train.val_fraction == 0 or not session.main:
            return {}
        # vectors: the model's own statistics (floored as the model floors them), as `loopwm eval` reads them
        mean, std = (stats["obs_mean"], stats["obs_std"]) if wm.spec.pixels else (wm.obs_mean, wm.obs_std)
        result = prediction_errors(wm, val_data, seed=cfg.seed, obs_mean=mean, obs_var=std.pow(2))
        session.write_text("eval.json", json.dumps(to_json(result), indent=2))  # NaN as null: strict JSON
    if progress:
        print(format_table(result))
    return result
