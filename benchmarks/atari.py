"""Atari 100k: scores, human-normalised scores and model errors of `loopwm run configs/atari/<game>.yaml` runs.

For each game the final checkpoint of `runs/<game>` (trained by `loopwm run configs/atari/<game>.yaml`,
resumable with `resume=true`) is evaluated on `--episodes` evaluation episodes with fixed reset seeds, next to a
uniformly random policy on the same seeds. Scores are raw game scores; human-normalised scores use the
reference random and human scores of `loopwm.envs.atari_games`. Held-out episodes, played by the agent's
training policy, give the next-frame error of the newest frame at 1 and 10 steps open loop (pixel MSE on a
0-1 scale) against copying the last observed frame, and the sign accuracy of 1-step reward predictions on
non-zero (clipped) rewards. Wall-clock time and peak RSS are the run's own, summed over its sittings, less any
time the run spent suspended (`--paused GAME=SECONDS`, e.g. while the machine ran something else alone). Games
measured by an earlier invocation into the same --out are kept, each with the command that measured it, unless this
invocation measures them again from a checkpoint.

    .venv/bin/python benchmarks/atari.py --games boxing breakout pong ms_pacman
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from loopwm.agents.online import Agent, evaluate
from loopwm.analysis.stats import auroc
from loopwm.app.evaluate import saved_agent
from loopwm.checkpoint import load_run
from loopwm.config import Config, load_config
from loopwm.envs.atari_games import ATARI_100K, game_of
from loopwm.envs.factory import action_from_model, make_env
from loopwm.world_model import WorldModel

from common import DEFAULT_OUT, REPO, command, load_average, machine_info, machine_md, md_table, write_outputs

DREAMERV3 = {"Boxing": 79.4, "Breakout": 9.0, "Pong": -4.2, "MsPacman": 1526.0}
"""DreamerV3's Atari 100k scores (Hafner et al. 2023, its published score file): the mean over 5 seeds of the
training-episode returns in the last 10% of the 400k frames."""

HORIZON = 10  # open-loop steps of the second frame error
EVAL_SEED = 30_000  # reset seeds EVAL_SEED + i, the same for every game, agent and the random policy
PLANNER = [
    "planner.method=mppi",
    "planner.samples=64",
    "planner.elites=8",
    "planner.iterations=2",
    "planner.policy_samples=8",
]
"""The latent planner `--planner` compares with the actor: categorical MPPI seeded by the actor's samples."""


def random_returns(cfg: Config, episodes: int) -> list[float]:
    """Raw scores of uniformly random actions on the evaluation seeds."""
    env, returns = make_env(cfg.env, training=False), []
    env.action_space.seed(EVAL_SEED)
    for i in range(episodes):
        env.reset(seed=EVAL_SEED + i)
        done, total = False, 0.0
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return returns


def held_out(agent: Agent, episodes: int, max_steps: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Episodes of the agent's training policy (sampled actions, clipped rewards): obs stacks, actions, rewards."""
    env, out = make_env(agent.cfg.env, training=True), []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        frames, actions, rewards = [obs], [], []
        done, t0 = False, True
        while not done and len(actions) < max_steps:
            action = agent.planned_action(obs, eval_mode=False, t0=t0)
            obs, reward, terminated, truncated, _ = env.step(action_from_model(action, agent.act_space))
            frames.append(obs)
            actions.append(action)
            rewards.append(reward)
            done, t0 = terminated or truncated, False
        out.append({"obs": np.stack(frames), "actions": np.stack(actions), "rewards": np.asarray(rewards, np.float32)})
    env.close()
    return out


@torch.no_grad()
def model_errors(wm: WorldModel, episodes: list[dict[str, np.ndarray]], horizon: int = HORIZON) -> dict[str, Any]:
    """Newest-frame MSE (0-1 pixels) of open-loop predictions at 1 and `horizon` steps against copying the last
    frame, the sign accuracy of 1-step reward predictions on non-zero and on zero rewards, and how well the
    predicted |reward| ranks the steps with a reward above those without (AUROC; 0.5 is a head that knows nothing,
    and it can be high while every prediction still rounds to 0), from the predicted latent and from the encoded
    true next frame."""
    wm.eval()
    model = {1: [], horizon: []}
    copy = {1: [], horizon: []}
    hits_nonzero, hits_zero = [], []
    magnitude, encoded, event = [], [], []
    lengths = [len(ep["actions"]) for ep in episodes]
    if max(lengths, default=0) < horizon:
        raise ValueError(
            f"every held-out episode ({lengths} steps) is shorter than the {horizon}-step horizon: "
            "raise --held-out or --held-out-steps"
        )
    for ep in episodes:
        obs, actions, rewards = ep["obs"], torch.as_tensor(ep["actions"]), ep["rewards"]
        starts = np.arange(0, len(actions) - horizon + 1, 2)
        for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / 128))):
            if len(chunk) == 0:
                continue
            steps = chunk[None] + np.arange(horizon)[:, None]  # [H, B]
            out = wm.imagine(wm.encode(torch.as_tensor(obs[chunk])), actions[steps], decode="all")
            pred = out.obs[:, :, -1] / 255.0  # newest frame of each predicted stack (decoded in pixel units)
            true = torch.as_tensor(obs[steps + 1][:, :, -1]).float() / 255.0
            last = torch.as_tensor(obs[chunk][:, -1]).float() / 255.0
            for h in (1, horizon):
                model[h].append((pred[h - 1] - true[h - 1]).pow(2).flatten(1).mean(1))
                copy[h].append((last - true[h - 1]).pow(2).flatten(1).mean(1))
            sign_pred = np.sign(np.round(out.rewards[0].numpy()))
            sign_true = np.sign(rewards[chunk])
            hits_nonzero += list((sign_pred == sign_true)[sign_true != 0])
            hits_zero += list((sign_pred == sign_true)[sign_true == 0])
            magnitude.append(out.rewards[0].abs().numpy())
            encoded.append(wm.reward_head(wm.encode(torch.as_tensor(obs[chunk + 1]))).abs().numpy())
            event.append(sign_true != 0)
    frame = {
        str(h): {"model": float(torch.cat(model[h]).mean()), "copy_last": float(torch.cat(copy[h]).mean())}
        for h in (1, horizon)
    }
    return {
        "frame_mse": frame,
        "predictions": int(sum(len(x) for x in model[1])),
        "reward_sign_accuracy_nonzero": float(np.mean(hits_nonzero)) if hits_nonzero else None,
        "nonzero_rewards": len(hits_nonzero),
        "reward_sign_accuracy_zero": float(np.mean(hits_zero)) if hits_zero else None,
        "reward_event_auroc": finite_or_none(auroc(np.concatenate(magnitude), np.concatenate(event))),
        # the same ranking with the head read on the encoder's latent of the true next frame: high here and low
        # above means the loop fails to predict the event; low here means the head, as trained, cannot read it from
        # the latent
        "reward_event_auroc_encoded": finite_or_none(auroc(np.concatenate(encoded), np.concatenate(event))),
    }


def finite_or_none(x: float) -> Optional[float]:
    """`x`, or None (JSON null) where it is NaN: an AUROC with one class empty."""
    return None if math.isnan(x) else x


def stats(returns: list[float]) -> dict[str, float]:
    r = np.asarray(returns, dtype=float)
    return {"mean": float(r.mean()), "se": float(r.std(ddof=1) / math.sqrt(len(r))) if len(r) > 1 else float("nan")}


def measure_game(stem: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report says about one game's run."""
    path = args.runs / stem
    cfg = load_config(REPO / "configs" / "atari" / f"{stem}.yaml")
    game = game_of(cfg.env.id)
    if not (path / "checkpoints" / "latest.pt").is_file():
        return {"game": game.name, "run": str(path), "status": "not run"}
    run = load_run(path)
    progress = run.payload["progress"]
    paused = args.paused.get(stem, 0.0)
    if paused and paused >= progress.get("elapsed_s", 0.0):
        raise SystemExit(
            f"--paused {stem}={paused:g}: the run's whole wall-clock time is {progress.get('elapsed_s', 0.0):.0f} s; "
            "a pause must be shorter than that"
        )
    elapsed = progress["elapsed_s"] - paused if progress.get("elapsed_s") else None
    agent = saved_agent(path, args.override)
    start = time.perf_counter()
    result = evaluate(agent, args.episodes, seed=EVAL_SEED)
    eval_s = time.perf_counter() - start
    rand = random_returns(agent.cfg, args.episodes)
    s, r = stats(result["returns"]), stats(rand)
    record = {
        "game": game.name,
        "run": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "status": "complete" if progress["step"] >= cfg.agent.total_steps else "partial",
        "agent_steps": int(progress["step"]),
        "updates": int(run.payload["trainer"]["updates"]) if "trainer" in run.payload else None,
        "returns": result["returns"],
        "score": s,
        "random_returns": rand,
        "random": r,
        "above_random_by_2se": bool(s["mean"] - r["mean"] > 2 * math.hypot(s["se"], r["se"])),
        "hns": game.normalised(s["mean"]),
        "reference": {"random": game.random, "human": game.human, "dreamerv3": DREAMERV3.get(game.name)},
        "ms_per_decision": result["ms_per_decision"],
        "eval_s": eval_s,
        "elapsed_s": progress.get("elapsed_s"),
        "paused_s": paused,
        "hours_per_100k": elapsed / 3600 * 100_000 / max(progress["step"], 1) if elapsed else None,
        "steps_per_s": progress["step"] / elapsed if elapsed else None,
        "peak_rss_mib": progress.get("peak_rss_mib"),
        "replay_mib": agent_replay_mib(run.payload),
    }
    record["model"] = model_errors(agent.wm, held_out(agent, args.held_out, args.held_out_steps, seed=EVAL_SEED + 500))
    if args.planner:
        planned = saved_agent(path, [*args.override, *PLANNER])
        start = time.perf_counter()
        p = evaluate(planned, args.planner_episodes, seed=EVAL_SEED)
        record["planner"] = {
            "overrides": PLANNER,
            "returns": p["returns"],
            "score": stats(p["returns"]),
            "ms_per_decision": p["ms_per_decision"],
            "eval_s": time.perf_counter() - start,
        }
    return record


def agent_replay_mib(payload: dict[str, Any]) -> Optional[float]:
    """Bytes the checkpointed replay holds (frames, actions and flags), in MiB."""
    replay = payload.get("replay")
    if not isinstance(replay, dict):
        return None
    total = 0
    stack = [replay]
    while stack:
        node = stack.pop()
        for value in node.values() if isinstance(node, dict) else node:
            if isinstance(value, (dict, list, tuple)):
                stack.append(value)
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                total += value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()
    return total / 2**20


def fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(payload: dict[str, Any]) -> str:
    done = [g for g in payload["games"] if g["status"] != "not run"]
    missing = [g["game"] for g in payload["games"] if g["status"] == "not run"]
    scores = md_table(
        [
            "game",
            "agent steps",
            "episodes",
            "loopwm",
            "random (here)",
            "> random + 2 SE?",
            "HNS",
            "random / human (ref.)",
            "DreamerV3",
            "h per 100k",
            "peak RSS MiB",
        ],
        [
            [
                g["game"],
                g["agent_steps"],
                len(g["returns"]),
                f"{g['score']['mean']:.1f} ± {fmt(g['score']['se'])}",
                f"{g['random']['mean']:.1f} ± {fmt(g['random']['se'])}",
                "yes" if g["above_random_by_2se"] else "no",
                f"{g['hns']:.3f}",
                f"{g['reference']['random']:g} / {g['reference']['human']:g}",
                fmt(g["reference"]["dreamerv3"]),
                fmt(g["hours_per_100k"], ".2f"),
                fmt(g["peak_rss_mib"], ".0f"),
            ]
            for g in done
        ],
    )
    model = md_table(
        [
            "game",
            "frame MSE @1 (model / copy last)",
            "frame MSE @10 (model / copy last)",
            "reward sign acc. (non-zero)",
            "non-zero rewards",
            "reward sign acc. (zero)",
            "reward-event AUROC",
            "AUROC, encoded next frame",
        ],
        [
            [
                g["game"],
                f"{g['model']['frame_mse']['1']['model']:.5f} / {g['model']['frame_mse']['1']['copy_last']:.5f}",
                f"{g['model']['frame_mse']['10']['model']:.5f} / {g['model']['frame_mse']['10']['copy_last']:.5f}",
                fmt(g["model"]["reward_sign_accuracy_nonzero"], ".3f"),
                g["model"]["nonzero_rewards"],
                fmt(g["model"]["reward_sign_accuracy_zero"], ".3f"),
                fmt(g["model"].get("reward_event_auroc"), ".3f"),
                fmt(g["model"].get("reward_event_auroc_encoded"), ".3f"),
            ]
            for g in done
        ],
    )
    parts = [
        "# Atari 100k",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "Scores: mean ± standard error over a game's evaluation episodes (reset seeds "
        f"{EVAL_SEED}+i, the same for loopwm and random). Protocol: configs/atari/base.yaml.",
        scores,
        "## World model",
        model,
    ]
    planned = [g for g in done if "planner" in g]
    if planned:
        parts += [
            "## Actor against the latent planner",
            "The same checkpoints, acting with the actor alone (the default) or with categorical MPPI seeded by "
            f"the actor's samples (`{' '.join(PLANNER)}`).",
            md_table(
                ["game", "actor", "ms/decision", "planner", "ms/decision"],
                [
                    [
                        g["game"],
                        f"{g['score']['mean']:.1f} ± {fmt(g['score']['se'])} ({len(g['returns'])} ep.)",
                        g["ms_per_decision"],
                        f"{g['planner']['score']['mean']:.1f} ± {fmt(g['planner']['score']['se'])} "
                        f"({len(g['planner']['returns'])} ep.)",
                        g["planner"]["ms_per_decision"],
                    ]
                    for g in planned
                ],
            ),
        ]
    paused = [g for g in done if g.get("paused_s")]
    if paused:
        parts.append(
            "Hours per 100k are net of the time a run was suspended: "
            + "; ".join(f"{g['game']} {g['paused_s']:.0f} s of {g['elapsed_s']:.0f} s" for g in paused)
            + "."
        )
    if missing:
        parts.append(f"Not run yet: {', '.join(missing)}.")
    parts += ["## Machine (this invocation)", machine_md(payload["machine"])]
    parts.append(
        "Each game was measured by (a game not measured again is kept from the invocation that measured it):\n"
        + "\n".join(f"- {g['game']}: `{g['command']}`" for g in done)
    )
    return "\n\n".join(parts)


def kept_games(path: Path, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The games of an earlier report at `path` that `measured` did not measure from a checkpoint, each with the
    command that measured it (a run folder lost since then does not erase its result), and the games it listed as not
    run that `measured` does not name."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    named = {g["game"] for g in measured}
    fresh = {g["game"] for g in measured if g["status"] != "not run"}
    kept = [
        g
        for g in earlier.get("games", [])
        if g["game"] not in fresh and (g["status"] != "not run" or g["game"] not in named)
    ]
    for game in kept:
        if game["status"] != "not run":
            game.setdefault("command", earlier["machine"]["command"])  # reports from before per-game commands
    return kept


def parse_paused(parser: argparse.ArgumentParser, items: list[str], games: list[str]) -> dict[str, float]:
    """`--paused pong=2265 ...` as {stem: seconds}, refusing games not measured and negative or unparsable times."""
    paused = {}
    for item in items:
        stem, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if stem not in games or not value >= 0:
            parser.error(f"--paused {item!r}: expected GAME=SECONDS with GAME one of --games and SECONDS >= 0")
        paused[stem] = value
    return paused


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--games",
        nargs="+",
        default=["boxing", "breakout", "pong", "ms_pacman"],
        choices=sorted(g.stem for g in ATARI_100K.values()),
    )
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="folder holding runs/<game>")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per game (>= 2)")
    parser.add_argument("--held-out", type=int, default=2, help="held-out episodes for the model errors")
    parser.add_argument("--held-out-steps", type=int, default=2000, help="steps per held-out episode at most")
    parser.add_argument("--planner", action="store_true", help="also evaluate the latent planner")
    parser.add_argument("--planner-episodes", type=int, default=3)
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for evaluation")
    parser.add_argument(
        "--paused",
        nargs="*",
        default=[],
        metavar="GAME=SECONDS",
        help="seconds a run spent suspended, subtracted from its wall-clock time",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="atari", help="stem of the JSON and markdown written to --out")
    args = parser.parse_args(argv)
    args.paused = parse_paused(parser, args.paused, args.games)
    if args.episodes < 2 or args.held_out < 1 or args.planner_episodes < 1 or args.held_out_steps < HORIZON:
        parser.error(f"--episodes must be >= 2, --held-out and --planner-episodes >= 1, --held-out-steps >= {HORIZON}")
    torch.set_num_threads(1)
    info = machine_info()
    info["command"] = command()
    games = [measure_game(stem, args) for stem in args.games]
    for game in games:
        if game["status"] != "not run":
            game["command"] = info["command"]
    kept = kept_games(args.out / f"{args.name}.json", games)
    replaced = {g["game"] for g in kept}
    games = sorted([g for g in games if g["game"] not in replaced] + kept, key=lambda g: g["game"])
    info["load_average_end"] = load_average()
    payload = {"machine": info, "episodes": args.episodes, "games": games}
    write_outputs(args.out, args.name, payload, markdown(payload))
    return payload


if __name__ == "__main__":
    main()
