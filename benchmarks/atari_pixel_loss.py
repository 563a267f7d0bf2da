"""Loss weights of the Atari world model: the encoder collapse at `train.w_obs=1`, larger weights, and variants.

One game's random-policy dataset (`loopwm.app.collect.collect`, cached under --data) is split by whole episodes.
Each variant is the game's config (configs/atari/<game>.yaml) with overrides: `--weights W ...` gives one variant
per observation-loss weight (`train.w_obs=W`), and `--define NAME='key=value ...'` adds one with any overrides
(for example the reward weight or `train.reward_balance`). Every variant trains a fresh model for the same updates
with the same seed, and at every evaluation point it is scored on the held-out episodes:
- the spread of the encoder's latents across held-out frames (std over frames, mean over dimensions; LayerNorm
  latents give about 1 for distinct frames and 0 when every frame maps to one latent);
- the newest-frame MSE at 1 and 10 steps open loop against copying the last frame (`atari.model_errors`);
- the sign accuracy of 1-step reward predictions on non-zero rewards, the AUROC of predicted |reward| for the
  steps with a reward, and the training loss terms.

    .venv/bin/python benchmarks/atari_pixel_loss.py --game boxing --weights 1 1000 10000 --updates 2000
    .venv/bin/python benchmarks/atari_pixel_loss.py --game boxing --weights 10000 --define r100='train.w_reward=100'
    .venv/bin/python benchmarks/atari_pixel_loss.py --smoke --data /tmp/apl --out /tmp/apl   # seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from atari import model_errors

from loopwm.config import Config, load_config
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel

from common import (
    DEFAULT_OUT,
    REPO,
    command,
    load_average,
    machine_info,
    machine_md,
    md_table,
    parse_define,
    write_outputs,
)

SMOKE = [
    "env.max_episode_steps=60",
    "model.latent_dim=16",
    "model.hidden_dim=32",
    "model.inject_dim=32",
    "model.mlp_dim=32",
    "model.cnn_channels=4",
    "train.batch_size=4",
]
TERMS = ("loss/obs", "loss/consistency", "loss/reward", "loss/reward_encoded")


def game_config(args: argparse.Namespace, variant: list[str]) -> Config:
    """The game's config on one CPU thread, with the dataset's path and size and the variant's overrides."""
    overrides = [
        f"seed={args.seed}",
        "threads=1",
        "device=cpu",
        f"data.path={dataset_path(args)}",
        f"data.steps={args.steps}",
        "data.policy=random",
        *(SMOKE if args.smoke else []),
        *variant,
    ]
    return load_config(REPO / "configs" / "atari" / f"{args.game}.yaml", overrides)


def dataset_path(args: argparse.Namespace) -> Path:
    return args.data / f"{args.game}-random-{args.steps}{'-smoke' if args.smoke else ''}.npz"


def dataset(cfg: Config) -> tuple[ReplayBuffer, ReplayBuffer, dict[str, Any]]:
    """The random-policy dataset at `data.path` (collected on first use), split by whole episodes (seed 0)."""
    from loopwm.app.collect import collect

    path = Path(cfg.data.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = ReplayBuffer.load(path) if path.is_file() else collect(cfg, progress=False)
    train, val = buffer.split(cfg.train.val_fraction, seed=0)
    info = {"transitions": len(buffer), "episodes": buffer.num_episodes, "val_episodes": val.num_episodes}
    return train, val, info


def held_out(val: ReplayBuffer, max_steps: int) -> list[dict[str, np.ndarray]]:
    """The held-out episodes, each cut to its first `max_steps` transitions."""
    return [
        {"obs": ep["obs"][: max_steps + 1], "actions": ep["actions"][:max_steps], "rewards": ep["rewards"][:max_steps]}
        for ep in val.episodes()
    ]


@torch.no_grad()
def latent_spread(wm: WorldModel, episodes: list[dict[str, np.ndarray]], frames: int = 512) -> float:
    """Std across up to `frames` held-out observations of their latents, averaged over latent dimensions."""
    obs = np.concatenate([ep["obs"] for ep in episodes])
    pick = np.linspace(0, len(obs) - 1, min(frames, len(obs))).astype(int)
    return float(wm.eval().encode(torch.as_tensor(obs[pick])).std(0).mean())


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each variant's name and overrides: one per `--weights` entry, then the `--define`d ones in order."""
    out = {f"w_obs={w:g}": [f"train.w_obs={w}"] for w in args.weights}
    for text in args.define:
        name, overrides = parse_define(text)
        if name in out:
            raise SystemExit(f"--define {text!r}: variant {name!r} is already defined")
        out[name] = overrides
    if not out:
        raise SystemExit("no variants: give --weights and/or --define")
    return out


def measure(
    name: str,
    overrides: list[str],
    cfg: Config,
    args: argparse.Namespace,
    train: ReplayBuffer,
    episodes: list[dict[str, np.ndarray]],
) -> dict[str, Any]:
    """Train one model of variant `name` on `train`, scoring it on `episodes` at every evaluation point."""
    from loopwm.app.session import seed_everything
    from loopwm.envs import env_spaces
    from loopwm.train import Trainer

    seed_everything(cfg.seed, cfg.threads)
    wm = WorldModel.from_config(cfg, *env_spaces(cfg.env))
    trainer = Trainer(wm, cfg, train)
    points = sorted({p for p in args.eval_at if 0 < p < args.updates} | {args.updates})
    curve, logged, seconds, done = [], [], 0.0, 0
    for point in points:
        start = time.perf_counter()
        while done < point:
            logged.append(trainer.update())
            done += 1
        seconds += time.perf_counter() - start
        recent = [row for row in logged[-50:] if row]
        losses = {k: float(np.mean([row[k] for row in recent])) for k in TERMS} if recent else {}
        errors = model_errors(wm, episodes, horizon=10)
        curve.append(
            {
                "updates": point,
                "train_seconds": round(seconds, 1),
                "latent_spread": latent_spread(wm, episodes),
                "losses": losses,
                **errors,
            }
        )
        print(f"{name}, {point} updates: spread {curve[-1]['latent_spread']:.3f}, {errors['frame_mse']}")
    return {
        "variant": name,
        "overrides": overrides,
        "w_obs": cfg.train.w_obs,
        "w_reward": cfg.train.w_reward,
        "reward_balance": cfg.train.reward_balance,
        "curve": curve,
    }


def fmt_auroc(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def other_overrides(overrides: list[str]) -> str:
    """A variant's overrides besides the two weights that have their own columns."""
    rest = [o for o in overrides if o.split("=", 1)[0] not in ("train.w_obs", "train.w_reward")]
    return " ".join(f"`{o}`" for o in rest) or "-"


def markdown(payload: dict[str, Any]) -> str:
    rows = []
    for run in payload["runs"]:
        for point in run["curve"]:
            frame, acc = point["frame_mse"], point["reward_sign_accuracy_nonzero"]
            rows.append(
                [
                    run["variant"],
                    f"{run['w_obs']:g}",
                    f"{run['w_reward']:g}",
                    other_overrides(run["overrides"]),
                    point["updates"],
                    f"{point['latent_spread']:.3f}",
                    f"{frame['1']['model']:.5f} / {frame['1']['copy_last']:.5f}",
                    f"{frame['10']['model']:.5f} / {frame['10']['copy_last']:.5f}",
                    "-" if acc is None else f"{acc:.2f} ({point['nonzero_rewards']})",
                    fmt_auroc(point["reward_event_auroc"]),
                    fmt_auroc(point.get("reward_event_auroc_encoded")),
                    f"{point['train_seconds']:.0f}",
                ]
            )
    info = payload["dataset"]
    return "\n\n".join(
        [
            "# Atari world-model loss weights",
            f"`benchmarks/atari_pixel_loss.py` on `{payload['game']}`: a random-policy dataset of "
            f"{info['transitions']:,} transitions ({info['episodes']} episodes, {info['val_episodes']} held out, "
            f"the first {payload['held_out_steps']} steps of each scored), {payload['updates']} updates of "
            f"configs/atari/{payload['game']}.yaml per variant (overrides in the JSON), seed {payload['seed']}. "
            "Latent spread: std of the encoder's latents across held-out frames (about 1 for distinct frames, 0 "
            "for a collapsed encoder). "
            "Frame MSE: newest frame, 0-1 pixels, model / copy-last-frame.",
            md_table(
                [
                    "variant",
                    "w_obs",
                    "w_reward",
                    "other overrides",
                    "updates",
                    "latent spread",
                    "1 step",
                    "10 steps",
                    "reward sign (non-zero)",
                    "reward AUROC",
                    "AUROC, encoded next frame",
                    "train s",
                ],
                rows,
            ),
            f"Command: `{payload['machine']['command']}`",
            "## Machine",
            machine_md(payload["machine"]),
        ]
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--game", default="boxing")
    parser.add_argument("--weights", type=float, nargs="*", default=[1.0, 1000.0, 10000.0], help="train.w_obs values")
    parser.add_argument("--define", action="append", default=[], help="NAME='key=value ...': a variant's overrides")
    parser.add_argument("--steps", type=int, default=30_000, help="dataset transitions (random policy)")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--eval-at", type=int, nargs="*", default=[500])
    parser.add_argument("--held-out-steps", type=int, default=500, help="steps scored per held-out episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, data and updates (numbers mean nothing)")
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "out" / "atari_pixel_loss")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="atari_pixel_loss", help="stem of the JSON and markdown written to --out")
    args = parser.parse_args(argv)
    if not args.name or Path(args.name).name != args.name:
        raise SystemExit(f"--name {args.name!r}: expected a file stem, without a folder")
    if args.smoke:
        args.steps, args.updates, args.eval_at, args.held_out_steps = 300, 4, [2], 30
    torch.set_num_threads(1)
    info = machine_info()
    todo = variants(args)
    configs = {name: game_config(args, overrides) for name, overrides in todo.items()}  # bad overrides fail here
    train, val, data_info = dataset(game_config(args, []))  # the same data for every variant
    episodes = held_out(val, args.held_out_steps)
    runs = [measure(name, todo[name], cfg, args, train, episodes) for name, cfg in configs.items()]
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {
        "machine": info,
        "game": args.game,
        "updates": args.updates,
        "seed": args.seed,
        "held_out_steps": args.held_out_steps,
        "dataset": data_info,
        "runs": runs,
    }
    write_outputs(args.out, args.name, payload, markdown(payload))
    return payload


if __name__ == "__main__":
    main()
