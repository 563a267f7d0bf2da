"""Run logging: TensorBoard event files plus a `metrics.jsonl` line per logging step."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from loopwm.atomic import atomic_write


class RunLogger:
    """Writes scalars and histograms to TensorBoard and scalars to metrics.jsonl in `run_dir`.

    Files open on the first `log`, so a resumed run can first `rewind` to its checkpoint's step.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._purge_step: Optional[int] = None
        self._writer: Any = None
        self._jsonl: Any = None

    def rewind(self, step: int) -> None:
        """Drop what an interrupted run logged after `step` (its last checkpoint), so a resumed run
        does not log those steps twice: metrics.jsonl is cut there and TensorBoard purges them."""
        if self._writer is not None:
            raise RuntimeError("RunLogger.rewind must come before the first log")
        self._purge_step = step + 1
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line)["step"] <= step]  # drops a line cut by a kill
            atomic_write(self.jsonl_path, lambda f: f.write("".join(kept).encode()))

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.run_dir), purge_step=self._purge_step)
        self._jsonl = open(self.jsonl_path, "a")

    def log(self, scalars: dict[str, float], step: int, histograms: Optional[dict[str, Any]] = None) -> None:
        """Log one step's scalars (and optional histograms)."""
        if self._writer is None:
            self._open()
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        for tag, values in (histograms or {}).items():
            self._writer.add_histogram(tag, torch.as_tensor(values).float(), step)
        clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()
