"""`loopwm analyze`: load a saved model and a dataset, then run the stability report of `loopwm.analysis`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from loopwm.analysis.report import analyze, sample_sequences
from loopwm.analysis.sections import Settings
from loopwm.app.train import held_out_split, load_checked
from loopwm.checkpoint import load_run


def analyze_checkpoint(
    checkpoint: str | Path,
    data: Optional[str | Path],
    out_dir: str | Path,
    *,
    compare: Optional[str | Path] = None,
    sequences: int = 64,
    device: str = "cpu",
    **overrides: Any,
) -> dict[str, Any]:
    """Load a checkpoint (or run folder) and a saved replay buffer (default: the run's held-out split), then
    `analyze`. `overrides` set `Settings` fields by name; `train_loops` defaults to the run's `train.loop_mean`."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown analysis setting {unknown[0]!r}; expected one of {sorted(names)}")
    run = load_run(checkpoint, map_location=device)
    if data is not None:
        buffer = load_checked(data, run.model)
    else:
        cfg = run.require_config("there is no default dataset: pass --data")
        buffer = held_out_split(cfg, run.model, run.kind, run.payload.get("dataset_sha256"))
    if run.config is not None and "train_loops" not in overrides:
        overrides["train_loops"] = max(1, round(run.config.train.loop_mean))
    settings = Settings(**overrides)
    other = load_run(compare, map_location=device).model if compare else None
    batch = sample_sequences(buffer, sequences, settings.horizon, settings.seed)
    return analyze(
        run.model, batch["obs"], batch["actions"], out_dir, rewards=batch["rewards"], compare=other, settings=settings
    )
