"""`loopwm eval RUN --video DIR`: the saved agent playing its real game, and the model imagining it.

Two outputs go to DIR:
- `rl-video-episode-<i>.mp4`, one per episode (Gymnasium's `RecordVideo`, which needs moviepy);
- the open-loop comparison: the agent plays `imagine_steps` steps from a real reset, and the model, given only
  the first real observation and the same actions, imagines them. Frame observations give `imagined.gif`, each
  frame the newest frame of the real stack | the imagined one | their absolute difference, with a bar below
  that fills as the horizon goes by; vector observations give `imagined.png`, one plot per dimension.

The comparison starts from the reset of the first episode (the same seed).
"""

from __future__ import annotations

import importlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from loopwm.agents.online import Agent, evaluate
from loopwm.app.evaluate import check_count, eval_seed, saved_agent
from loopwm.atomic import atomic_write
from loopwm.config import ConfigError
from loopwm.envs.factory import action_from_model, make_env
from loopwm.logger import encode_gif
from loopwm.nets import SpaceSpec

SCALE = 2  # nearest-neighbour upscaling of each panel
SEPARATOR = 2  # white pixels between panels
BAR = 3  # rows of the horizon bar below the panels
GIF_FPS = 10
PLOTTED = 16  # vector dimensions drawn at most


@dataclass
class OpenLoop:
    """A real rollout from a reset and the model's open-loop imagination of it."""

    real: np.ndarray  # [T+1, ...] real observations; real[0] is the start the model is given
    imagined: np.ndarray  # [T, ...] imagined[k] is the model's prediction of real[k + 1]
    actions: np.ndarray  # [T, A] the agent's actions, in model units


def record_videos(
    path: str | Path, out_dir: str | Path, episodes: int = 1, imagine_steps: int = 50, seed: Optional[int] = None
) -> dict[str, Any]:
    """Play the saved agent for `episodes` episodes into MP4s in `out_dir` (episode i reset with seed + i), then
    write its open-loop comparison of `imagine_steps` steps from the first episode's reset. Returns the returns
    (as `evaluate_planner`) with the paths written under "videos" and "imagined"."""
    check_count("episodes", episodes)
    check_count("imagine_steps", imagine_steps)
    if seed is not None:
        check_count("seed", seed, minimum=0)
    agent = saved_agent(path)
    spec = agent.wm.spec
    require_writers(spec)
    seed = eval_seed(agent, seed)
    out = Path(out_dir)
    result = evaluate(agent, episodes, seed=seed, video_dir=str(out))
    result["videos"] = [str(out / f"rl-video-episode-{i}.mp4") for i in range(episodes)]
    rollout = open_loop(agent, imagine_steps, seed)
    target = out / ("imagined.gif" if spec.pixels else "imagined.png")
    data = encode_gif(side_by_side(rollout), GIF_FPS) if spec.pixels else plot_dimensions(rollout)
    atomic_write(target, lambda f: f.write(data))
    result.update(imagined=str(target), imagined_steps=len(rollout.actions))
    return result


def require_writers(spec: SpaceSpec) -> None:
    """Fail before anything is played or written when a writer is missing or the observations cannot be drawn."""
    if spec.obs_parts:
        raise ConfigError(
            "--video draws the imagined rollout of (C, H, W) frames or of vectors, not of Dict observations; "
            "`loopwm eval RUN --episodes N` still reports the returns"
        )
    needed = [("moviepy", "the episodes as MP4", "video"), ("PIL", "the GIF", "video")]
    if not spec.pixels:
        needed[1] = ("matplotlib", "imagined.png", "analysis")
    for module, what, extra in needed:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"--video writes {what} with {module}: pip install 'loopwm[{extra}]' ({exc})") from exc


def open_loop(agent: Agent, steps: int, seed: int) -> OpenLoop:
    """The agent's evaluation play for up to `steps` steps from `reset(seed=seed)` (fewer if the episode ends),
    and the model's imagination of them from the first real observation alone."""
    env = make_env(agent.cfg.env, training=False)
    obs, _ = env.reset(seed=seed)
    real, actions = [obs], []
    for k in range(steps):
        action = agent.planned_action(obs, eval_mode=True, t0=k == 0)
        obs, _, terminated, truncated, _ = env.step(action_from_model(action, agent.act_space))
        real.append(obs)
        actions.append(action)
        if terminated or truncated:
            break
    env.close()
    agent.planner.reset()
    wm = agent.wm
    start = torch.as_tensor(real[0][None], device=wm.device)
    with torch.no_grad():
        out = wm.imagine(
            wm.encode(start), torch.as_tensor(np.stack(actions)[:, None], device=wm.device), decode="all", obs=start
        )
    return OpenLoop(np.stack(real), out.obs[:, 0].cpu().numpy(), np.stack(actions))


def side_by_side(rollout: OpenLoop) -> np.ndarray:
    """Greyscale GIF frames [T, H', W'] of a frame rollout: for each step the newest frame of the real stack,
    the imagined one and their absolute difference, each upscaled SCALE times, between white separators,
    above a bar that fills to (k + 1) / T (which also keeps every frame distinct, so the GIF keeps all T)."""
    real = rollout.real[1:, -1].astype(np.int16)
    imagined = np.clip(np.rint(rollout.imagined[:, -1]), 0, 255).astype(np.int16)
    panels = [
        p.astype(np.uint8).repeat(SCALE, axis=1).repeat(SCALE, axis=2) for p in (real, imagined, abs(real - imagined))
    ]
    t, h, w = panels[0].shape
    line = np.full((t, h, SEPARATOR), 255, np.uint8)
    bar = np.full((t, BAR, 3 * w + 2 * SEPARATOR), 64, np.uint8)
    for k in range(t):
        bar[k, :, : math.ceil(bar.shape[2] * (k + 1) / t)] = 255
    return np.concatenate([np.concatenate([panels[0], line, panels[1], line, panels[2]], axis=2), bar], axis=1)


def plot_dimensions(rollout: OpenLoop) -> bytes:
    """A PNG of a vector rollout: per dimension (the first PLOTTED), the real trajectory and the imagined one."""
    from matplotlib.figure import Figure

    total = rollout.real.shape[1]
    dims = min(total, PLOTTED)
    cols = min(dims, 4)
    rows = math.ceil(dims / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows + 0.4), layout="constrained")
    steps = np.arange(len(rollout.real))
    for i in range(dims):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(steps, rollout.real[:, i], color="black", label="real")
        imagined = np.r_[rollout.real[0, i], rollout.imagined[:, i]]  # from the real start it was given
        ax.plot(steps, imagined, color="tab:red", linestyle="--", label="imagined")
        ax.set_title(f"obs[{i}]", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.axes[0].legend(fontsize=8)
    shown = f" (the first {dims} of {total} dimensions)" if dims < total else ""
    fig.suptitle(f"real vs imagined, open loop from a real start, by step{shown}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
