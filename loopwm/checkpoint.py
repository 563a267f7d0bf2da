"""Atomic, versioned checkpoints that load with `torch.load(weights_only=True)`, and the one loader of runs.

A checkpoint is a dict of tensors and plain data: the model's weights, its config and space spec,
a format tag and version, plus whatever extras the caller adds (optimiser, replay, RNG, counters).
A run's checkpoint also holds the run config and its kind ("run" or "train"); `load_run` reads one,
from its file or from the run folder that holds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from loopwm.atomic import atomic_write
from loopwm.config import Config, ConfigError, ModelConfig
from loopwm.nets import SpaceSpec
from loopwm.sections import build_dataclass
from loopwm.world_model import WorldModel

FORMAT = "loopwm-checkpoint"
VERSION = 2  # 2: LoopCore.gain_logit (was rho), config sections (env.atari, block_options), planner state
LATEST = Path("checkpoints") / "latest.pt"
"""Where a run folder keeps its resumable checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, foreign or from an unknown format version."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save(path: str | Path, wm: WorldModel, **extras: Any) -> None:
    """Save a world model (and any checkpointable extras) atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(wm.cfg),
        "spec": wm.spec.to_dict(),
        "model": wm.state_dict(),
        **extras,
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint's payload, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or garbage files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated, corrupt or not a safe torch file: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a loopwm checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {payload.get('version')!r}; "
            f"this loopwm reads version {VERSION}"
        )
    return payload


def model_from_payload(payload: dict, path: str | Path = "<memory>") -> WorldModel:
    """Rebuild the world model stored in a checkpoint payload."""
    try:
        cfg = build_dataclass(ModelConfig, with_earlier_behaviour({"model": payload["model_config"]})["model"], "model")
        wm = WorldModel(cfg, SpaceSpec.from_dict(payload["spec"]))
        wm.load_state_dict(payload["model"])
    except (KeyError, TypeError, ConfigError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model section: {exc}") from None
    return wm


EARLIER_BEHAVIOUR = {
    ("agent", "prior_gradient"): "dynamics",
    ("model", "error_head_hidden"): 0,
    ("train", "error_target"): "latent",
}
"""Config keys added after runs had been saved, with the value that gives what those runs did; a saved config
without such a key gets this value rather than the key's default, so it resumes and evaluates unchanged."""


def with_earlier_behaviour(saved: dict) -> dict:
    """A saved config (sections of plain dicts) with every `EARLIER_BEHAVIOUR` key it lacks filled in."""
    saved = dict(saved)
    for (section, key), value in EARLIER_BEHAVIOUR.items():
        if isinstance(saved.get(section), dict) and key not in saved[section]:
            saved[section] = {**saved[section], key: value}
    return saved


def config_from_payload(payload: dict, path: str | Path = "<memory>") -> Config | None:
    """The run config a checkpoint was saved with, or None for a bare model checkpoint."""
    if "config" not in payload:
        return None
    saved = with_earlier_behaviour(payload["config"])
    try:
        return build_dataclass(Config, saved, "")
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config section: {exc}") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> WorldModel:
    """Load the world model from a checkpoint written by `save` (or by a training run)."""
    return model_from_payload(read_checkpoint(path, map_location), path)


@dataclass(frozen=True)
class LoadedRun:
    """A checkpoint read back: the file, its payload, the rebuilt model, and the run config (None for a
    bare model written by `save` alone: callers that need a config say so through `require_config`)."""

    path: Path
    payload: dict
    model: WorldModel
    config: Optional[Config]

    @property
    def kind(self) -> Optional[str]:
        """ "run" or "train" for a run's checkpoint (inferred from its parts for files that predate the tag),
        None for a bare model."""
        if "kind" in self.payload:
            return self.payload["kind"]
        if "trainer" in self.payload:
            return "run" if "agent" in self.payload else "train"
        return None

    @property
    def agent(self) -> Optional[dict]:
        """The agent's parts (value, prior, planner, RNG) of a `loopwm run` checkpoint, else None."""
        return self.payload.get("agent")

    def require_config(self, purpose: str) -> Config:
        """The run config, or a ConfigError saying that a bare model cannot serve `purpose`."""
        if self.config is None:
            raise ConfigError(
                f"checkpoint {str(self.path)!r} holds no run config (a bare model saved with loopwm.save), so {purpose}"
            )
        return self.config


def load_run(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedRun:
    """Read a checkpoint file, or a run folder's `checkpoints/latest.pt`, into its model, config and payload."""
    path = Path(path)
    file = path / LATEST if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise CheckpointError(f"run folder {str(path)!r} has no checkpoint ({LATEST})")
    payload = read_checkpoint(file, map_location)
    return LoadedRun(file, payload, model_from_payload(payload, file), config_from_payload(payload, file))
