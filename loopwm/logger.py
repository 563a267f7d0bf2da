"""Run logging: TensorBoard event files plus a `metrics.jsonl` line per logging step, optionally mirrored
to Weights & Biases (extra `[wandb]`; `wandb: true` in a config, off by default)."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from loopwm.atomic import atomic_write


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """Frames [T, H, W] (greyscale) or [T, H, W, 3] uint8 as an animated GIF that loops, encoded with Pillow."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    buf = io.BytesIO()
    duration = max(1, int(1000 // fps))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buf.getvalue()


def gif_summary(tag: str, frames: np.ndarray, fps: int) -> Any:
    """A TensorBoard image summary holding frames [T, H, W, 3] uint8 as an animated GIF (TensorBoard's
    video format)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encode_gif(frames, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def require_wandb() -> None:
    """Fail early, naming the extra, when W&B mirroring is asked for but wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"wandb=true needs Weights & Biases: pip install 'loopwm[wandb]' ({exc})") from exc


class RunLogger:
    """Writes scalars and histograms to TensorBoard and scalars to metrics.jsonl in `run_dir`.

    Files open on the first `log`, so a resumed run can first `rewind` to its checkpoint's step. With
    `wandb_project`, every scalar and video also goes to a W&B run (named after the folder, resumed with
    it; ``WANDB_MODE=offline`` keeps it local).
    """

    def __init__(self, run_dir: str | Path, *, wandb_project: Optional[str] = None, config: Optional[dict] = None):
        if wandb_project is not None:
            require_wandb()
        self.wandb_project, self.config = wandb_project, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._purge_step: Optional[int] = None
        self._writer: Any = None
        self._jsonl: Any = None
        self._wandb: Any = None

    @classmethod
    def for_config(cls, run_dir: str | Path, cfg: Any) -> "RunLogger":
        """The logger a run of `cfg` writes with: W&B mirroring as `cfg.wandb` / `cfg.wandb_project` say."""
        from loopwm.config import to_dict

        return cls(run_dir, wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))

    def rewind(self, step: int) -> None:
        """Drop what an interrupted run logged after `step` (its last checkpoint), so a resumed run
        does not log those steps twice: metrics.jsonl is cut there and TensorBoard purges them."""
        if self._writer is not None:
            raise RuntimeError("RunLogger.rewind must come before the first log")
        self._purge_step = step + 1
        if self.jsonl_path.exists():
            kept = [
                line
                for line in self.jsonl_path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line)["step"] <= step
            ]  # drops a line cut by a kill
            atomic_write(self.jsonl_path, lambda f: f.write("".join(kept).encode()))

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.run_dir), purge_step=self._purge_step)
        self._jsonl = open(self.jsonl_path, "a")
        if self.wandb_project is not None:
            import wandb

            key = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
            name = self.run_dir.name
            self._wandb = wandb.init(
                project=self.wandb_project,
                name=name,
                id=f"{name}-{key}",
                dir=str(self.run_dir),
                config=self.config,
                resume="allow",
            )

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
        if self._wandb is not None:
            self._wandb.log(dict(scalars), step=step)

    def log_video(self, tag: str, frames: np.ndarray, step: int, fps: int = 30) -> None:
        """Log frames [T, H, W, 3] uint8 (an evaluation episode) as a TensorBoard video, and to W&B."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError(
                f"video frames must be uint8 of shape (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}"
            )
        if self._writer is None:
            self._open()
        self._writer._get_file_writer().add_summary(gif_summary(tag, frames, fps), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Video(frames.transpose(0, 3, 1, 2), fps=fps, format="gif")}, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
