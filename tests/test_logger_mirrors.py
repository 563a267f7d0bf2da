"""RunLogger's optional outputs: evaluation videos in TensorBoard, and a W&B mirror of the scalars (offline)."""

import io

import numpy as np
import pytest

from loopwm.config import ConfigError, from_dict
from loopwm.logger import RunLogger


def frames(t=5, h=24, w=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_a_video_lands_in_tensorboard_as_an_animated_gif(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path)
    video = frames()
    logger.log_video("eval/video", video, step=7, fps=10)
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert "eval/video" in events.Tags()["images"]
    (record,) = events.Images("eval/video")
    assert record.step == 7 and (record.height, record.width) == (24, 32)
    gif = Image.open(io.BytesIO(record.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.info["duration"] == 100
    gif.seek(2)
    decoded = np.asarray(gif.convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - video[2]).mean() < 40  # GIF's 256-colour palette, not another frame
    with pytest.raises(ValueError, match=r"uint8 of shape \(T, H, W, 3\)"):
        RunLogger(tmp_path / "b").log_video("v", video[..., :1], step=0)


def test_the_online_loop_logs_its_evaluation_episode_as_a_video(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loopwm.app.run import run

    cfg = from_dict(
        {
            "name": "vid",
            "run_dir": str(tmp_path),
            "device": "cpu",
            "env": {"id": "Pendulum-v1", "max_episode_steps": 10},
            "model": {"latent_dim": 8, "hidden_dim": 16, "inject_dim": 16, "mlp_dim": 32, "loops": 1},
            "planner": {"horizon": 1, "iterations": 1, "samples": 8, "elites": 2, "policy_samples": 0},
            "agent": {"total_steps": 10, "seed_steps": 10, "eval_every": 10, "eval_episodes": 1, "eval_video": True},
        }
    )
    run(cfg, progress=False)
    events = EventAccumulator(str(tmp_path / "vid"), size_guidance={"images": 0})
    events.Reload()
    assert [r.step for r in events.Images("eval/video")] == [0, 10]


def test_wandb_mirrors_the_scalars_in_offline_mode(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is in the [wandb] extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = from_dict({"name": "mirror", "wandb": True, "wandb_project": "loopwm-test"})
    logger = RunLogger.for_config(tmp_path / "mirror", cfg)
    logger.log({"loss/total": 0.5, "eval/return_mean": -120.0}, step=3)
    logger.log({"loss/total": 0.25}, step=4)
    logger.log_video("eval/video", frames(t=3), step=4)
    logger.log({"loss/total": 0.125}, step=5)  # W&B commits a step's row when the next step arrives
    run = logger._wandb
    assert run.project == "loopwm-test" and run.name == "mirror" and run.config["wandb"] is True
    assert run.summary["loss/total"] == 0.25 and run.summary["eval/return_mean"] == -120.0
    assert "eval/video" in run.summary.keys()
    logger.close()
    assert wandb.run is None  # finished with the logger
    offline = list((tmp_path / "mirror" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert (tmp_path / "mirror" / "metrics.jsonl").read_text().count("\n") == 3  # the JSONL is unchanged


def test_wandb_is_off_by_default_and_checked_up_front():
    assert from_dict({}).wandb is False
    assert RunLogger.for_config("unused", from_dict({})).wandb_project is None
    with pytest.raises(ConfigError, match="wandb"):
        from_dict({"wandb": "yes"})
