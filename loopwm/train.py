"""`Trainer`: fits a world model on a replay buffer, logs, checkpoints and resumes exactly."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from loopwm import checkpoint as ckpt
from loopwm.checkpoint import LoadedRun, load_run
from loopwm.config import Config, ConfigError, to_dict
from loopwm.logger import RunLogger
from loopwm.objective import TERMS, QuantileTracker, sequence_loss
from loopwm.optim import build_optimizer, build_schedule, load_optimizer_state, optimizer_state
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; a CUDA device this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: CUDA is not available (torch {torch.__version__} sees no GPU); "
                              "use device=cpu, or device=auto to take a GPU when there is one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


class Stop(Protocol):
    """What `Trainer.fit` polls between updates: `received` turns non-None once a stop was asked for
    (`loopwm.app.session.StopSignal` sets it on SIGTERM or Ctrl-C)."""

    received: Optional[int]


class Trainer:
    """Owns the model's optimiser, schedule, sampling RNGs and counters; `fit` runs updates."""

    def __init__(self, wm: WorldModel, cfg: Config, replay: ReplayBuffer, logger: Optional[RunLogger] = None):
        self.wm, self.cfg, self.replay, self.logger = wm, cfg, replay, logger
        t = cfg.train
        self.opt = build_optimizer(t.optimizer, wm.parameters(), t.lr, t.weight_decay, t.lookahead)
        self.schedule = build_schedule(self.opt, t.lr_schedule, t.updates, t.warmup)
        self.rng = np.random.default_rng(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.tracker = QuantileTracker(t.hard_quantile)
        self.updates = 0
        self._window: dict[str, list[float]] = {}

    # ---- one update ----------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        """One gradient step on a freshly sampled batch; returns the step's scalars."""
        t = self.cfg.train
        start = time.perf_counter()
        batch = self.replay.sample(t.batch_size, t.horizon, self.rng)
        device = self.wm.device
        batch = {k: v.to(device) for k, v in batch.items()}
        self.wm.train()
        loss, terms, stats = sequence_loss(self.wm, batch, t, self.generator, self.tracker)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at update {self.updates}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), clip)
        self.opt.step()
        self.schedule.step()
        self.updates += 1
        loops = torch.stack(stats.loops).float()
        elapsed = time.perf_counter() - start
        out = {f"loss/{k}": float(v) for k, v in terms.items()}
        out.update({
            "loss/total": float(loss.detach()), "train/grad_norm": float(grad_norm),
            "train/lr": self.schedule.get_last_lr()[0],
            "loops/mean": float(loops.mean()), "loops/max": float(loops.max()),
            "loops/hard_fraction": stats.hard_fraction, "loops/hard_threshold": self.tracker.value or 0.0,
            "certificate/kappa": self.wm.certified_lipschitz(),
            "certificate/residual_at_exit": float(torch.stack(stats.bounds).mean()),
            "perf/transitions_per_s": t.batch_size * t.horizon / max(elapsed, 1e-9),
        })
        self._last_loops = loops.flatten()
        return out

    def fit(self, updates: Optional[int] = None, progress: bool = True,
            on_checkpoint: Optional[Callable[[], None]] = None,
            stop: Optional[Stop] = None) -> dict[str, float]:
        """Run updates until `updates` in total (or until `stop` receives a signal, after a final
        checkpoint), logging and checkpointing along the way."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        target = t.updates if updates is None else updates
        bar = tqdm(total=target, initial=self.updates, disable=not progress, desc="fit", dynamic_ncols=True)
        last: dict[str, float] = {}
        while self.updates < target and (stop is None or stop.received is None):
            last = self.update()
            for k, v in last.items():
                self.record(k, v)
            if self.updates % t.log_every == 0 or self.updates == target:
                self.flush_logs()
                bar.set_postfix(loss=f"{last['loss/total']:.3f}", loops=f"{last['loops/mean']:.1f}",
                                kappa=f"{last['certificate/kappa']:.3f}", tps=f"{last['perf/transitions_per_s']:.0f}")
            if on_checkpoint is not None and (self.updates % t.checkpoint_every == 0 or self.updates == target):
                on_checkpoint()
            bar.update(1)
        bar.close()
        if stop is not None and stop.received is not None and on_checkpoint is not None:
            on_checkpoint()
        return last

    def record(self, key: str, value: float) -> None:
        """Add a scalar to the current logging window (averaged at the next flush)."""
        self._window.setdefault(key, []).append(value)

    def flush_logs(self, step: Optional[int] = None) -> None:
        """Log the mean of each scalar since the last flush, plus the loops-used histogram, at `step`
        (default: updates)."""
        if self.logger is not None and self._window:
            means = {k: float(np.mean(v)) for k, v in self._window.items()}
            self.logger.log(means, self.updates if step is None else step,
                            histograms={"loops/used": self._last_loops})
        self._window = {}

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: optimiser, schedule, RNGs and counters."""
        return {
            "optimizer": optimizer_state(self.opt),
            "schedule": self.schedule.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "tracker": self.tracker.value,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.opt, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.generator.set_state(state["torch_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.tracker.value = state["tracker"]
        self.updates = int(state["updates"])


def save_run(path: str | Path, trainer: Trainer, **extras: Any) -> None:
    """A resumable checkpoint: model, config, trainer state and the replay buffer."""
    ckpt.save(path, trainer.wm, config=to_dict(trainer.cfg), trainer=trainer.state_dict(),
              replay=trainer.replay.state_dict(), **extras)


def restore_run(source: str | Path | LoadedRun, trainer: Trainer) -> dict[str, Any]:
    """Load a checkpoint written by `save_run` (a path, or one already read by `load_run`) into an existing
    trainer, its model and its replay; returns the payload."""
    run = source if isinstance(source, LoadedRun) else load_run(source)
    if "trainer" not in run.payload:
        raise ckpt.CheckpointError(f"checkpoint {str(run.path)!r} has no trainer state: it cannot be resumed")
    trainer.wm.load_state_dict(run.model.state_dict())
    trainer.load_state_dict(run.payload["trainer"])
    if "replay" in run.payload:
        trainer.replay.load_state_dict(run.payload["replay"])
    return run.payload


__all__ = ["Stop", "Trainer", "save_run", "restore_run", "resolve_device", "TERMS"]
