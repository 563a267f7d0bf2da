"""Run logging: TensorBoard event files plus a `metrics.jsonl` line per logging step."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch


class RunLogger:
    """Writes scalars and histograms to TensorBoard and scalars to metrics.jsonl in `run_dir`."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.run_dir))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def log(self, scalars: dict[str, float], step: int, histograms: Optional[dict[str, Any]] = None) -> None:
        """Log one step's scalars (and optional histograms)."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in (histograms or {}).items():
            self.writer.add_histogram(tag, torch.as_tensor(values).float(), step)
        clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
