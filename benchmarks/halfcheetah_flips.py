"""Does a saved HalfCheetah agent flip onto its back, and does its planner or its data cause it?

For each checkpoint of an online run (`loopwm run` / benchmarks/control.py), this
(a) replays episodes with the saved agent, in evaluation mode (the deterministic planner) or training
    mode (with its exploration noise), under planner overrides such as a longer horizon, and records
    each episode's return and the first step where the torso pitch |rooty| passed 1.5 rad (flipped);
(b) reads the run's replay buffer: the share of flipped states in each part of the run, and the
    learned value of flipped against upright states.

The model, value and prior are the checkpoint's; only the planner settings change between variants,
so a variant that stops flipping points at the planner, not at what the model learned.

    .venv/bin/python benchmarks/halfcheetah_flips.py CKPT [CKPT ...] --episodes 3 \\
        --variant eval --variant train --variant eval:planner.horizon=10,planner.samples=128,planner.elites=16
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopwm.agents.online import Agent
from loopwm.checkpoint import config_from_payload, read_checkpoint
from loopwm.config import Config, PlannerConfig, apply_overrides, from_dict, to_dict
from loopwm.envs.factory import action_from_model, make_env
from loopwm.train import restore_run

from common import DEFAULT_OUT, command, load_average, machine_info, machine_md, md_table, write_outputs

FLIP_PITCH = 1.5  # rad: the torso has turned past vertical
PITCH, SPEED = 1, 8  # HalfCheetah-v5 observation indices of rooty and of the forward velocity


def load_agent(path: Path) -> tuple[Agent, Config, dict, Any]:
    """The agent saved in an online run's checkpoint, with its replay buffer."""
    payload = read_checkpoint(path)
    cfg = config_from_payload(payload, path)
    if cfg is None or not cfg.env.id.startswith("HalfCheetah"):
        raise SystemExit(f"{path}: not a HalfCheetah online-run checkpoint")
    env = make_env(cfg.env, training=True)
    agent = Agent(cfg, env.observation_space, env.action_space)
    restore_run(path, agent.trainer)
    agent.load_state_dict(payload["agent"])
    return agent, cfg, payload, env


def planner_with(cfg: Config, text: str) -> PlannerConfig:
    """The run's planner settings with `planner.KEY=VALUE,...` overrides, checked like any config."""
    overrides = [item for item in text.split(",") if item]
    if any(not item.startswith("planner.") for item in overrides):
        raise SystemExit(f"{text!r}: only planner.* settings can change between variants")
    fixed = [
        item for item in overrides if item.split("=")[0].split(".")[-1] in (*PlannerConfig.LOOP_OPTIONS, "warm_start")
    ]
    if fixed:
        raise SystemExit(
            f"{text!r}: {', '.join(fixed)} cannot change between variants (the planner sets its loops once)"
        )
    return from_dict(apply_overrides(to_dict(cfg), overrides)).planner


def episodes(agent: Agent, env: Any, n: int, eval_mode: bool, seed: int) -> list[dict[str, Any]]:
    """n episodes with the agent's planner; return and first flipped step (None if it stayed upright)."""
    out = []
    for e in range(n):
        obs, _ = env.reset(seed=seed + e)
        ret, t0, flipped_at, done, step = 0.0, True, None, False, 0
        while not done:
            action = agent.planned_action(obs, eval_mode=eval_mode, t0=t0)
            obs, reward, terminated, truncated, _ = env.step(action_from_model(action, env.action_space))
            ret, t0, step, done = ret + float(reward), False, step + 1, terminated or truncated
            if flipped_at is None and abs(float(obs[PITCH])) > FLIP_PITCH:
                flipped_at = step
        out.append({"return": ret, "flipped_at": flipped_at})
    return out


def replay_report(agent: Agent, parts: int = 4) -> dict[str, Any]:
    """Flipped share of the replay per part of the run, and the value of upright and flipped states."""
    obs = torch.as_tensor(np.concatenate([episode["obs"] for episode in agent.replay.episodes()])).float()
    flipped = obs[:, PITCH].abs() > FLIP_PITCH
    with torch.no_grad():
        value = torch.cat([agent.value(agent.wm.encode(obs[i : i + 4096])).flatten() for i in range(0, len(obs), 4096)])
    bounds = np.linspace(0, len(obs), parts + 1).astype(int)
    groups = {"upright": ~flipped, "upright, speed > 5": ~flipped & (obs[:, SPEED] > 5), "flipped": flipped}
    return {
        "states": len(obs),
        "flipped_share_by_part": [
            [int(a), int(b), float(flipped[a:b].float().mean())] for a, b in zip(bounds[:-1], bounds[1:])
        ],
        "value": {
            k: {
                "n": int(m.sum()),
                "value": float(value[m].mean()) if m.any() else None,
                "speed": float(obs[m, SPEED].mean()) if m.any() else None,
            }
            for k, m in groups.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="MODE[:planner.KEY=VALUE,...]",
        help="eval or train, with optional planner overrides; repeatable (default: eval)",
    )
    parser.add_argument("--seed", type=int, default=900, help="first episode seed (fresh episodes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    results, rows = [], []
    for path in args.checkpoints:
        agent, cfg, payload, env = load_agent(path)
        step = int(payload["progress"]["step"])
        replay = replay_report(agent)
        planner_state = agent.planner.state_dict()
        for variant in args.variant or ["eval"]:
            mode, _, text = variant.partition(":")
            if mode not in ("eval", "train"):
                raise SystemExit(f"variant {variant!r}: the mode must be eval or train")
            agent.planner.cfg = planner_with(cfg, text)
            agent.planner.reset()
            agent.planner.load_state_dict(planner_state)  # every variant sees the same sampling noise
            eps = episodes(agent, env, args.episodes, mode == "eval", args.seed)
            returns = [e["return"] for e in eps]
            flips = [e["flipped_at"] for e in eps]
            results.append(
                {"checkpoint": str(path), "step": step, "mode": mode, "planner": text or "config", "episodes": eps}
            )
            rows.append(
                [
                    step,
                    mode,
                    text or "config",
                    f"{np.mean(returns):.0f}",
                    ", ".join(f"{r:.0f}" for r in returns),
                    f"{sum(f is not None for f in flips)}/{len(flips)}",
                    ", ".join("–" if f is None else str(f) for f in flips),
                ]
            )
            print(rows[-1], flush=True)
        results.append({"checkpoint": str(path), "step": step, "replay": replay})
        env.close()
    info.update(command=command(), load_average_end=load_average())
    replay_rows = [
        [
            r["step"],
            r["replay"]["states"],
            ", ".join(f"{share:.2f}" for _, _, share in r["replay"]["flipped_share_by_part"]),
            *(
                f"{g['value']:.0f} (n={g['n']})" if g["value"] is not None else "–"
                for g in r["replay"]["value"].values()
            ),
        ]
        for r in results
        if "replay" in r
    ]
    md = "\n\n".join(
        [
            "# HalfCheetah: flips, by checkpoint and planner setting",
            "Episodes replayed with each saved agent (seeds from {}); *flipped at* is the first step with "
            "|rooty| > {} rad.".format(args.seed, FLIP_PITCH),
            md_table(["run step", "mode", "planner", "mean return", "returns", "flipped", "flipped at"], rows),
            "Replay buffer: flipped share of the states in each quarter of the run, and the learned value.",
            md_table(
                ["run step", "states", "flipped share by quarter", "V upright", "V upright, speed > 5", "V flipped"],
                replay_rows,
            ),
            "## Machine",
            machine_md(info),
        ]
    )
    write_outputs(args.out, "halfcheetah_flips", {"machine": info, "results": results}, md)


if __name__ == "__main__":
    main()
