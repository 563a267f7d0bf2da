"""One run session, used by `loopwm run` and `loopwm train`: the run folder, its lock and kind, the resolved
config, the logger, resume with rewind, and stop signals.

A run folder `run_dir/name/` holds `run.json` (which command made it), `.lock` (held with `flock` by the one
process writing there, and naming its PID), `config.yaml` (the resolved config), the logs (`metrics.jsonl`,
TensorBoard events), `checkpoints/latest.pt` and `summary.json` or `eval.json`.

Opening a session checks everything before anything is written: the name stays inside `run_dir`; no other
process writes there; the folder was made by the same command; a checkpoint is only continued with
`resume=true`, and only with the config (but for `RESUMABLE` keys, and keys inert in both configs,
`config_rules.inert_keys`) and spaces it was saved with; logs without a
checkpoint (a run killed before its first save) are only cut, for a clean start, with `resume=true`. Writing starts with
`start`; a run killed at any point after that resumes from its last checkpoint as if it had not stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
from pathlib import Path, PurePath
from typing import IO, Any, Callable, Optional

import numpy as np
import torch
import yaml

from loopwm import distributed
from loopwm.atomic import atomic_write, remove_stale_temp_files
from loopwm.checkpoint import LATEST, LoadedRun, load_run
from loopwm.config import Config, ConfigError, to_dict
from loopwm.config_rules import inert_keys
from loopwm.logger import RunLogger, require_wandb
from loopwm.nets import SpaceSpec
from loopwm.train import Trainer, resolve_device, restore_run, save_run

KINDS = ("run", "train")
MARKER, LOCK = "run.json", ".lock"
LOGS = ("metrics.jsonl", "events.out.tfevents.*", "summary.json", "eval.json")
RESUMABLE = frozenset(
    {
        "config.resume",
        "config.name",
        "config.run_dir",  # where the folder is, not what it holds
        "config.device",
        "config.threads",
        "config.wandb",
        "config.wandb_project",
        "config.env.num_envs",
        "config.env.vectorization",  # how many copies of the env run, not which env
        "config.train.updates",
        "config.agent.total_steps",  # how long the run goes on
        "config.train.log_every",
        "config.train.checkpoint_every",
        "config.agent.eval_every",
        "config.agent.eval_episodes",
        "config.agent.eval_video",  # how often it reports and saves
    }
)
"""The keys a resumed run may change: where and how fast it runs, how long it goes on and how often it reports.
Any other difference (a learning rate, a dataset, a seed, the planner) would silently be ignored by the restored
state or mix two settings in one run, so it is refused."""
_COLLECTION = {"config.data.steps", "config.data.policy", "config.data.noise", "config.data.planner_checkpoint"}
UNREAD = {"run": frozenset({*_COLLECTION, "config.data.path"}), "train": frozenset(_COLLECTION)}
"""Per command, the keys it never reads (only `loopwm collect` does): changing them on resume changes nothing."""


class RunFolderError(ConfigError):
    """A run folder cannot be used with this config (its name, `resume`); the message says why and what to do."""


class RunWriteError(OSError):
    """A write into a run folder failed (a full disk, a read-only folder); the checkpoint before it is intact."""


class StopSignal:
    """Inside the block, SIGTERM (from `kill` or a cluster scheduler) and Ctrl-C only set `received`,
    so a loop stops at its next safe point and saves; a second signal interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def exit_if_received(self, where: str = "") -> None:
        """After the caller has saved (or before it wrote anything): say so on stderr and leave with the
        conventional status of the signal."""
        if self.received is not None:
            print(
                f"loopwm: stopped by {signal.Signals(self.received).name}{' ' + where if where else ''}",
                file=sys.stderr,
            )
            raise SystemExit(128 + self.received)


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed torch and numpy's global state (our own generators are seeded separately)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if threads:
        torch.set_num_threads(threads)


def run_folder(cfg: Config) -> Path:
    """`run_dir/name`, once `name` is known to be a plain name or a relative path that stays inside `run_dir`."""
    name = PurePath(cfg.name)
    if not cfg.name.strip() or name.is_absolute() or ".." in name.parts or not name.parts:
        raise ConfigError(
            f"name={cfg.name!r}: expected a plain name or a relative path inside "
            f"run_dir={cfg.run_dir!r} (not empty, not absolute, no '..')"
        )
    return Path(cfg.run_dir) / name


def differences(saved: Any, current: Any, key: str) -> list[str]:
    """`key.sub: saved -> current` for every leaf where two nested dicts (or lists) differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            line
            for k in sorted(set(saved) | set(current), key=str)
            for line in differences(saved.get(k), current.get(k), f"{key}.{k}")
        ]
    return [] if saved == current else [f"{key}: {saved} -> {current}"]


def _plain(value: Any) -> Any:
    """Tuples as lists, so values read back from a checkpoint compare equal to freshly built ones."""
    return json.loads(json.dumps(value))


def _lock(folder: Path) -> IO[str]:
    """Hold `folder/.lock` with an exclusive `flock` (the OS drops it when the process dies), or fail naming
    the process that holds it."""
    handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        handle.close()
        holder = f"process {pid}" if pid else "another process"
        raise RunFolderError(
            f"run folder {str(folder)!r} is in use by {holder}, which holds {LOCK} there: wait "
            "for it to finish, or choose another name=..."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class RunSession:
    """A run folder held for one `run` or `train`: `with RunSession(cfg, kind) as session:` checks and locks,
    `session.start(spec)` writes, `session.restore(...)` resumes, `session.save(...)` checkpoints.

    `session.stop` is live from the start, so a signal during start-up ends the run before anything is
    written; `session.logger` logs into the folder once started. Under torchrun only rank 0 (`main`)
    creates, locks and writes the folder; the other ranks run the same checks and have no logger.
    """

    def __init__(self, cfg: Config, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
        resolve_device(cfg.device)  # a device this machine lacks fails here, before any folder exists
        if cfg.wandb:
            require_wandb()
        self.cfg, self.kind = cfg, kind
        self.main = distributed.current().main
        self.folder = run_folder(cfg)
        self.latest = self.folder / LATEST
        self.stop = StopSignal()
        self.resumed: Optional[LoadedRun] = None
        self.logger: Optional[RunLogger] = None
        self.started = False
        self._lock: Optional[IO[str]] = None
        self._created: list[Path] = []

    # ---- opening: nothing is written but the lock ------------------------------------------------------
    def __enter__(self) -> "RunSession":
        self.stop.__enter__()
        try:
            if not self.main:  # torchrun's other ranks: the same checks, and nothing written
                self._check_folder()
                return self
            self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunWriteError(f"cannot create run folder {str(self.folder)!r}: {exc}") from None
            self._lock = _lock(self.folder)
            self._check_folder()
            self.logger = RunLogger.for_config(self.folder, self.cfg)  # opens its files on the first log
        except BaseException:
            self.__exit__()
            raise
        return self

    def _refuse(self, why: str) -> RunFolderError:
        return RunFolderError(f"run folder {str(self.folder)!r} {why}")

    def _check_folder(self) -> None:
        marker, has_checkpoint = self.folder / MARKER, self.latest.is_file()
        made_by = self._made_by(marker) if marker.is_file() else None
        if made_by is None and has_checkpoint:  # a folder from before kinds were recorded
            self.resumed = load_run(self.latest)
            made_by = self.resumed.kind
        if made_by is not None and made_by != self.kind:
            raise self._refuse(
                f"was made by `loopwm {made_by}`; `loopwm {self.kind}` cannot continue it: choose another name=..."
            )
        if has_checkpoint:
            if not self.cfg.resume:
                raise self._refuse(
                    f"already has {self.latest.name}: pass resume=true to continue it, or choose another name=..."
                )
            self.resumed = self.resumed or load_run(self.latest)
            saved_cfg = self.resumed.require_config("it cannot be resumed")
            saved, current = to_dict(saved_cfg), to_dict(self.cfg)
            allowed = RESUMABLE | UNREAD[self.kind] | (inert_keys(saved_cfg) & inert_keys(self.cfg))
            diff = [
                line.removeprefix("config.")
                for line in differences(saved, current, "config")
                if line.split(":")[0] not in allowed
            ]
            done, key, target = self._progress()
            slack = saved["env"]["num_envs"] - 1 if self.kind == "run" else 0  # its envs step together: overshoot
            if target + slack < done:
                raise self._refuse(
                    f"is at {done} already; {key}={target} would end it before where it is: pass {key} >= {done} "
                    "to continue it (a shorter run is a new run: choose another name=...)"
                )
            if diff:
                raise self._refuse(
                    "was saved with another config; resuming it may change only how long it runs, how often it "
                    f"reports, and where and how fast it runs, but {'; '.join(diff)} (keep the saved values, or "
                    "choose another name=... for a new run)"
                )
        elif self._logs() and not self.cfg.resume:
            raise self._refuse(
                "has logs but no checkpoint (its run stopped before the first save): pass "
                "resume=true to start it again from scratch, its logs cut, or choose another name=..."
            )

    def _made_by(self, marker: Path) -> str:
        """The command recorded in `run.json`, or a refusal naming the file when it is damaged."""
        try:
            kind = json.loads(marker.read_text())["kind"]
        except (ValueError, KeyError, TypeError) as exc:
            kind, exc_text = None, f"{type(exc).__name__}: {exc}"
        else:
            exc_text = f"kind {kind!r}"
        if kind not in KINDS:
            raise self._refuse(
                f'has a damaged {MARKER} ({exc_text}); it should read {{"kind": "run"}} or '
                f'{{"kind": "train"}}, as the command that made the folder wrote it: restore it, or choose '
                "another name=..."
            )
        return kind

    def _progress(self) -> tuple[int, str, int]:
        """How far the checkpoint got, the key that sets how far this command goes, and its value."""
        payload = self.resumed.payload
        if self.kind == "run":
            return int(payload["progress"]["step"]), "agent.total_steps", self.cfg.agent.total_steps
        return int(payload["trainer"]["updates"]), "train.updates", self.cfg.train.updates

    def _logs(self) -> list[Path]:
        return [path for pattern in LOGS for path in self.folder.glob(pattern)]

    # ---- writing ----------------------------------------------------------------------------------------
    def start(self, spec: SpaceSpec) -> None:
        """Check the env's spaces against the checkpoint's, leave if a signal came during start-up, then write:
        stale temp files go, a clean start cuts old logs, and the folder's kind and resolved config are saved."""
        if self.resumed is not None:
            saved = SpaceSpec.from_dict(self.resumed.payload["spec"])  # read as the loader does: keys added since
            diff = differences(_plain(saved.to_dict()), _plain(spec.to_dict()), "spaces")  # take their defaults
            if diff:
                raise self._refuse(f"was saved for other spaces: {'; '.join(diff)}")
        self.stop.exit_if_received("during start-up; nothing was written")
        if not self.main:
            return
        self.started = True
        for folder in (self.folder, self.latest.parent):
            remove_stale_temp_files(folder)
        if self.resumed is None:
            for path in self._logs():
                path.unlink()
        self.write_text(MARKER, json.dumps({"kind": self.kind}) + "\n")
        self.write_text("config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def restore(self, trainer: Trainer, log_step: Callable[[dict], int]) -> Optional[dict]:
        """When resuming: load the checkpoint into `trainer` (model, optimiser, replay, RNGs), cut the logs back
        to `log_step(payload)` so nothing after the checkpoint is counted twice, and return the payload."""
        if self.resumed is None:
            return None
        payload = restore_run(self.resumed, trainer)
        if self.logger is not None:
            self.logger.rewind(log_step(payload))
        return payload

    def save(self, trainer: Trainer, **extras: Any) -> None:
        """Write the resumable checkpoint (under torchrun every rank calls this, and rank 0 writes); a failed
        write raises one `RunWriteError` and keeps the previous one."""
        try:
            save_run(self.latest, trainer, kind=self.kind, **extras)
        except OSError as exc:
            raise RunWriteError(
                f"cannot write {str(self.latest)!r}: {exc.strerror or exc}; the checkpoint there before is unchanged"
            ) from None

    def write_text(self, name: str, text: str) -> None:
        """Write `folder/name` atomically (rank 0 only); a failed write raises a `RunWriteError` naming it."""
        if not self.main:
            return
        path = self.folder / name
        try:
            atomic_write(path, lambda f: f.write(text.encode()))
        except OSError as exc:
            raise RunWriteError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None

    # ---- closing ----------------------------------------------------------------------------------------
    def __exit__(self, *exc: Any) -> None:
        if self.logger is not None:
            self.logger.close()
        if self._lock is not None:
            if not self.started:  # a start that wrote nothing leaves no folders behind that it made
                for folder in self._created:
                    (folder / LOCK).unlink(missing_ok=True)
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            self._lock.close()  # releases the flock
            self._lock = None
        self.stop.__exit__()
