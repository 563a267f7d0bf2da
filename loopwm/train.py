"""`Trainer`: fits a world model on a replay buffer, logs, checkpoints and resumes exactly, in one process
or data-parallel under torchrun (`loopwm.distributed`)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from loopwm import checkpoint as ckpt
from loopwm import distributed
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
            raise ConfigError(
                f"device={name!r}: CUDA is not available (torch {torch.__version__} sees no GPU); "
                "use device=cpu, or device=auto to take a GPU when there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


class Stop(Protocol):
    """What `Trainer.fit` polls between updates: `received` turns non-None once a stop was asked for
    (`loopwm.app.session.StopSignal` sets it on SIGTERM or Ctrl-C)."""

    received: Optional[int]


class NonFiniteLoss(FloatingPointError):
    """`train.max_nonfinite` updates in a row had a NaN or inf loss or gradient, so training cannot go on."""


class Trainer:
    """Owns the model's optimiser, schedule, sampling RNGs and counters; `fit` runs updates.

    In a torch.distributed process group (torchrun) each process samples `train.batch_size / processes`
    sequences from its own streams (rank 0's are the single-process ones) and gradients are averaged
    after every backward pass, so each update uses `train.batch_size` sequences in all.
    """

    def __init__(
        self,
        wm: WorldModel,
        cfg: Config,
        replay: ReplayBuffer,
        logger: Optional[RunLogger] = None,
        planned_updates: Optional[int] = None,
    ):
        """`planned_updates` is how many updates the learning-rate schedule spans (default `train.updates`);
        the online loop passes its own count, so a decaying schedule ends with the run, not at `train.updates`.
        """
        self.wm, self.cfg, self.replay, self.logger = wm, cfg, replay, logger
        t = cfg.train
        self.world = distributed.current()
        if t.batch_size % self.world.size:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be divisible by the number of processes "
                f"({self.world.size}): each one trains on an equal share of every batch"
            )
        self.world.broadcast_parameters(wm)
        self.opt = build_optimizer(t.optimizer, wm.parameters(), t.lr, t.weight_decay, t.lookahead)
        head = getattr(wm.core, "error_head", None)
        head_params = [] if head is None else list(head.parameters())
        in_head = {id(p) for p in head_params}
        self._clip_groups = ([p for p in wm.parameters() if id(p) not in in_head], head_params)
        self.schedule = build_schedule(
            self.opt, t.lr_schedule, t.updates if planned_updates is None else planned_updates, t.warmup
        )
        self.rng = np.random.default_rng(distributed.rank_seed(cfg.seed, self.world.rank))
        self.generator = torch.Generator().manual_seed(distributed.rank_torch_seed(cfg.seed, self.world.rank))
        self.tracker = QuantileTracker(t.hard_quantile)
        self.updates = 0
        self.nonfinite_skipped = 0  # updates skipped for a NaN or inf loss or gradient, over the whole run
        self._nonfinite_run = 0  # ... of them in a row, right now
        self.last_checkpoint: Optional[tuple[str, int]] = None  # (path, updates) of the last save or restore
        self._window: dict[str, list[float]] = {}
        self._last_loops: Optional[torch.Tensor] = None  # loops used per sample in the last update, for the histogram

    # ---- one update ----------------------------------------------------------------------
    def update(self, batch: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
        """One gradient step on a freshly sampled batch (this process's share of it) or on `batch`.

        Returns the step's scalars (losses averaged over all processes), or {} when the loss or the
        gradient was NaN or inf: then the step is skipped and counted (see `_skip`).
        """
        t = self.cfg.train
        start = time.perf_counter()
        if batch is None:
            batch = self.replay.sample(t.batch_size // self.world.size, t.horizon, self.rng)
        device = self.wm.device
        batch = {k: v.to(device) for k, v in batch.items()}
        self.wm.train()
        loss, terms, stats = sequence_loss(self.wm, batch, t, self.generator, self.tracker)
        # one collective for the logged means; every process sees the same total, so all skip together
        scalars = self.world.mean(torch.stack([loss.detach(), *(v.to(loss.device) for v in terms.values())]))
        if not torch.isfinite(scalars[0]):
            return self._skip()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.world.average_gradients(self.wm.parameters())
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        # the error head is clipped on its own: it watches the model, and its gradients never rescale the model's
        model, head = self._clip_groups
        grad_norm = torch.nn.utils.clip_grad_norm_(model, clip)
        head_norm = torch.nn.utils.clip_grad_norm_(head, clip) if head else None
        if not torch.isfinite(grad_norm) or (head_norm is not None and not torch.isfinite(head_norm)):
            self.opt.zero_grad(set_to_none=True)
            return self._skip()
        self._nonfinite_run = 0
        self.opt.step()
        self.schedule.step()
        self.updates += 1
        loops = torch.stack(stats.loops).float()
        elapsed = time.perf_counter() - start
        out = {f"loss/{k}": float(v) for k, v in zip(terms, scalars[1:])}
        out.update(
            {
                "loss/total": float(scalars[0]),
                "train/grad_norm": float(grad_norm),  # the model's, the error head's apart
                **({} if head_norm is None else {"train/error_head_grad_norm": float(head_norm)}),
                "train/latent_spread": stats.latent_spread,
                "train/lr": self.schedule.get_last_lr()[0],
                "loops/mean": float(loops.mean()),
                "loops/max": float(loops.max()),
                "loops/hard_fraction": stats.hard_fraction,
                "loops/hard_threshold": self.tracker.value or 0.0,
                "certificate/kappa": self.wm.certified_lipschitz(),
                "certificate/residual_at_exit": float(torch.stack(stats.bounds).mean()),
                "perf/transitions_per_s": t.batch_size * t.horizon / max(elapsed, 1e-9),
            }
        )
        self._last_loops = loops.flatten()
        return out

    def _skip(self) -> dict[str, float]:
        """Count an update skipped for a non-finite loss or gradient; `train.max_nonfinite` in a row stop the run."""
        self.nonfinite_skipped += 1
        self._nonfinite_run += 1
        limit = self.cfg.train.max_nonfinite
        if self._nonfinite_run >= limit:
            where = (
                "no checkpoint has been written in this run"
                if self.last_checkpoint is None
                else f"the last good checkpoint: {self.last_checkpoint[0]} (update {self.last_checkpoint[1]})"
            )
            raise NonFiniteLoss(
                f"the training loss or its gradient was NaN or inf in {limit} consecutive updates after update "
                f"{self.updates} (train.max_nonfinite={limit}); they were skipped, so the model is as it was "
                f"after update {self.updates}; {where}"
            )
        return {}

    def fit(
        self,
        updates: Optional[int] = None,
        progress: bool = True,
        on_checkpoint: Optional[Callable[[], None]] = None,
        stop: Optional[Stop] = None,
    ) -> dict[str, float]:
        """Run updates until `updates` in total (or until `stop` receives a signal, after a final
        checkpoint), logging and checkpointing along the way."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        target = t.updates if updates is None else updates
        bar = tqdm(total=target, initial=self.updates, disable=not progress, desc="fit", dynamic_ncols=True)
        last: dict[str, float] = {}
        stopped = False
        while self.updates < target and not (stopped := self._stop_requested(stop)):
            out = self.update()
            if not out:
                continue  # skipped for a non-finite loss: nothing to log or save
            last = out
            for k, v in last.items():
                self.record(k, v)
            if self.updates % t.log_every == 0 or self.updates == target:
                self.flush_logs()
                bar.set_postfix(
                    loss=f"{last['loss/total']:.3f}",
                    loops=f"{last['loops/mean']:.1f}",
                    kappa=f"{last['certificate/kappa']:.3f}",
                    tps=f"{last['perf/transitions_per_s']:.0f}",
                )
            if on_checkpoint is not None and (self.updates % t.checkpoint_every == 0 or self.updates == target):
                on_checkpoint()
            bar.update(1)
        bar.close()
        if stopped and on_checkpoint is not None:
            on_checkpoint()
        return last

    def _stop_requested(self, stop: Optional[Stop]) -> bool:
        """Whether a signal asks to stop before the next update. Under torchrun the processes decide together:
        one that was not signalled itself adopts SIGTERM, so all save and leave at the same update."""
        if stop is None:
            return False
        if self.world.any(stop.received is not None) and stop.received is None:
            stop.received = signal.SIGTERM
        return stop.received is not None

    def record(self, key: str, value: float) -> None:
        """Add a scalar to the current logging window (averaged at the next flush)."""
        self._window.setdefault(key, []).append(value)

    def flush_logs(self, step: Optional[int] = None) -> None:
        """Log the mean of each scalar since the last flush, plus the loops-used histogram, at `step`
        (default: updates)."""
        if self.logger is not None and self._window:
            means = {k: float(np.mean(v)) for k, v in self._window.items()}
            means["train/nonfinite_skipped"] = float(self.nonfinite_skipped)
            loops = {"loops/used": self._last_loops} if self._last_loops is not None else None
            self.logger.log(means, self.updates if step is None else step, histograms=loops)
        self._window = {}

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: optimiser, schedule, RNGs and counters. Under torchrun every
        process must call it (it gathers each process's sampling streams, so each resumes its own)."""
        state = {
            "optimizer": optimizer_state(self.opt),
            "schedule": self.schedule.state_dict(),
            **self._streams(),
            "updates": self.updates,
            "nonfinite_skipped": self.nonfinite_skipped,
            # the open logging window: the next row after a resume averages the same updates as without a stop
            "log_window": {k: [float(x) for x in v] for k, v in self._window.items()},
            "last_loops": self._last_loops,
        }
        if self.world.size > 1:
            state["world_size"] = self.world.size
            state["ranks"] = self.world.gather(self._streams())
        return state

    def _streams(self) -> dict[str, Any]:
        """This process's own random state: sampling RNGs, torch's global RNG and the hard-quantile tracker."""
        return {
            "numpy_rng": self.rng.bit_generator.state,
            "torch_generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "tracker": self.tracker.value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = int(state.get("world_size", 1))
        if saved != self.world.size:
            how = "without torchrun" if saved == 1 else f"torchrun --nproc_per_node={saved}"
            raise ckpt.CheckpointError(
                f"the checkpoint was trained by {saved} process(es) and this run has {self.world.size}: resume it "
                f"with the same number ({how}), so that every process continues its own sampling stream"
            )
        streams = state["ranks"][self.world.rank] if saved > 1 else state
        load_optimizer_state(self.opt, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = streams["numpy_rng"]
        self.generator.set_state(streams["torch_generator"])
        torch.set_rng_state(streams["torch_rng"])
        self.tracker.value = streams["tracker"]
        self.updates = int(state["updates"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self._window = {k: list(v) for k, v in state.get("log_window", {}).items()}
        self._last_loops = state.get("last_loops", self._last_loops)


def save_run(path: str | Path, trainer: Trainer, **extras: Any) -> None:
    """A resumable checkpoint: model, config, trainer state and the replay buffer. Under torchrun every
    process calls it and only rank 0 writes."""
    state = trainer.state_dict()
    if trainer.world.main:
        ckpt.save(
            path, trainer.wm, config=to_dict(trainer.cfg), trainer=state, replay=trainer.replay.state_dict(), **extras
        )
    trainer.last_checkpoint = (str(path), trainer.updates)


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
    trainer.last_checkpoint = (str(run.path), trainer.updates)
    return run.payload


__all__ = ["NonFiniteLoss", "Stop", "Trainer", "save_run", "restore_run", "resolve_device", "TERMS"]
