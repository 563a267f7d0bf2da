"""Online control: loopwm's planning agent against stable-baselines3 SAC at equal environment steps.

Runs `loopwm run` (the same code path as the CLI) for each seed and, with --sac, SB3's SAC with
the same step budgets and seeds on the same machine, evaluating both with deterministic policies
on fresh episodes. stable-baselines3 is a benchmark-only dependency (`pip install stable-baselines3`).

    python benchmarks/control.py --env pendulum --seeds 0 1 --steps 2000 4000 --sac
    python benchmarks/control.py --env halfcheetah --seeds 0 --steps 50000 --override planner.horizon=10 --tag h10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from loopwm.app.run import run
from loopwm.config import load_config

from common import machine_info

CONFIGS = {
    "pendulum": "configs/pendulum.yaml",
    "inverted_pendulum": "configs/inverted_pendulum.yaml",
    "halfcheetah": "configs/halfcheetah.yaml",
}


def loopwm_curve(
    env: str,
    seed: int,
    steps: list[int],
    eval_episodes: int,
    out: Path,
    threads: int,
    overrides: list[str],
    resume: bool,
    tag: str = "",
) -> dict:
    """One online run to max(steps), evaluated at every budget; returns {budget: (mean, std)} and timing.

    With `resume`, a run interrupted earlier continues from its last checkpoint; its wall time is the run's own,
    summed over the invocations that ran it (`elapsed_s`), so a finished run reloaded keeps its time."""
    every = int(np.gcd.reduce(steps))
    name = f"{env}-s{seed}" + (f"-{tag}" if tag else "")
    cfg = load_config(
        CONFIGS[env],
        [
            f"seed={seed}",
            f"name={name}",
            f"run_dir={out}",
            f"agent.total_steps={max(steps)}",
            f"agent.eval_every={every}",
            f"agent.eval_episodes={eval_episodes}",
            f"threads={threads}",
            f"resume={str(resume).lower()}",
            *overrides,
        ],
    )
    summary = run(cfg, progress=False)
    curve = {int(s): (m, sd) for s, m, sd in summary["curve"]}
    return {
        "curve": {s: curve[s] for s in steps if s in curve},
        "seconds": summary["elapsed_s"],
        "kappa": summary["kappa"],
    }


def sac_curve(env: str, seed: int, steps: list[int], eval_episodes: int) -> dict:
    """SB3 SAC (default hyper-parameters) on the same env, evaluated at the same budgets."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.evaluation import evaluate_policy

    from loopwm.envs.factory import make_env

    cfg = load_config(CONFIGS[env], [f"seed={seed}"])
    model = SAC("MlpPolicy", make_env(cfg.env, seed), seed=seed, verbose=0, device="cpu")
    curve, done, start = {}, 0, time.perf_counter()
    for budget in sorted(steps):
        model.learn(total_timesteps=budget - done, reset_num_timesteps=False)
        done = budget
        eval_env = make_env(cfg.env, 10_000 + budget, training=False)
        mean, std = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
        curve[budget] = (float(mean), float(std))
    return {"curve": curve, "seconds": time.perf_counter() - start}


def table(results: dict, steps: list[int]) -> str:
    lines = [
        "| method | seed | " + " | ".join(f"{s} steps" for s in steps) + " | wall s |",
        "| --- | --- | " + " | ".join("---" for _ in steps) + " | --- |",
    ]
    for method, runs in results.items():
        for seed, r in runs.items():
            cells = [f"{r['curve'][s][0]:.0f} ± {r['curve'][s][1]:.0f}" if s in r["curve"] else "–" for s in steps]
            lines.append(f"| {method} | {seed} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
        means = [np.mean([r["curve"][s][0] for r in runs.values() if s in r["curve"]] or [np.nan]) for s in steps]
        lines.append(f"| {method} | mean | " + " | ".join(f"{m:.0f}" for m in means) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", choices=sorted(CONFIGS), default="pendulum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 4000, 10000])
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--sac", action="store_true", help="also run stable-baselines3 SAC")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the loopwm runs, e.g. planner.samples=128",
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted loopwm runs from their checkpoints")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--tag", default="", help="names a variant (with --override): its runs and report files get it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path("benchmarks/out/control")
    results: dict = {"loopwm": {}}
    for seed in args.seeds:
        results["loopwm"][seed] = loopwm_curve(
            args.env, seed, args.steps, args.eval_episodes, work, args.threads, args.override, args.resume, args.tag
        )
        print(f"loopwm seed {seed}: {results['loopwm'][seed]['curve']}", flush=True)
    if args.sac:
        results["sac"] = {}
        for seed in args.seeds:
            results["sac"][seed] = sac_curve(args.env, seed, args.steps, args.eval_episodes)
            print(f"sac seed {seed}: {results['sac'][seed]['curve']}", flush=True)
    command = "python benchmarks/control.py " + " ".join(
        [
            f"--env {args.env}",
            "--seeds " + " ".join(map(str, args.seeds)),
            "--steps " + " ".join(map(str, args.steps)),
            f"--eval-episodes {args.eval_episodes}",
            f"--threads {args.threads}",
        ]
        + (["--sac"] if args.sac else [])
        + (["--override " + " ".join(args.override)] if args.override else [])
        + (["--resume"] if args.resume else [])
        + ([f"--tag {args.tag}"] if args.tag else [])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"env": args.env, "command": command, "machine": machine_info(), "results": results}
    stem = f"control_{args.env}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    md = (
        f"# Online control on {args.env}\n\nEval return (mean ± std over {args.eval_episodes} deterministic "
        f"episodes) at each environment-step budget.\n\nMachine: {record['machine']}\n\nCommand: `{command}`\n\n"
        + table(results, args.steps)
        + "\n"
    )
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
