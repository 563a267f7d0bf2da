"""Vector acting: environment steps per second of `loopwm run`'s acting at env.num_envs = 1, 4 and 16.

The online loop's `VectorCollector` steps Pendulum-v1 copies in a Gymnasium vector env and plans for all of
them in one batched planner call (`configs/pendulum.yaml`: MPPI, horizon 3, 2 iterations of 128 samples,
policy prior and value). Only acting is timed: planning, the env steps and the replay writes, no model
updates (they do not depend on num_envs). The model is untrained: a decision costs the same whatever the
weights. One thread, as the config sets.

    .venv/bin/python benchmarks/vector_acting.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from loopwm.agents.collector import VectorCollector
from loopwm.agents.online import Agent
from loopwm.config import load_config
from loopwm.envs.factory import make_vector_env

from common import DEFAULT_OUT, REPO, command, load_average, machine_info, machine_md, md_table, write_outputs

CONFIG = REPO / "configs" / "pendulum.yaml"


def measure(num_envs: int, vectorization: str, seconds: float, warmup: int) -> dict[str, Any]:
    """Env steps per second of planned acting in `num_envs` environments, over about `seconds`."""
    cfg = load_config(CONFIG, [f"env.num_envs={num_envs}", f"env.vectorization={vectorization}", "device=cpu"])
    torch.manual_seed(0)
    envs = make_vector_env(cfg.env, training=True, autoreset=gym.vector.AutoresetMode.DISABLED)
    agent = Agent(cfg, envs.single_observation_space, envs.single_action_space)
    collector = VectorCollector(envs, agent.replay, seed=0)
    plan_time = 0.0

    def policy(obs: np.ndarray, starts: np.ndarray) -> np.ndarray:
        nonlocal plan_time
        start = time.perf_counter()
        action = agent.planned_action(obs, eval_mode=False, t0=starts, batched=True)
        plan_time += time.perf_counter() - start
        return action

    collector.restart()
    for _ in range(warmup):
        collector.step(policy)
    plan_time, calls, start = 0.0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        collector.step(policy)
        calls += 1
    wall = time.perf_counter() - start
    collector.close()
    return {
        "num_envs": num_envs,
        "vectorization": vectorization,
        "planner_calls": calls,
        "wall_s": wall,
        "env_steps_per_s": num_envs * calls / wall,
        "ms_per_planner_call": 1000 * plan_time / calls,
        "planning_share": plan_time / wall,
    }


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["results"]
    base = next(r["env_steps_per_s"] for r in rows if r["num_envs"] == 1 and r["vectorization"] == "sync")
    table = md_table(
        [
            "env.num_envs",
            "vectorization",
            "env steps/s",
            "× num_envs=1",
            "ms per planner call",
            "share of time planning",
            "planner calls timed",
        ],
        [
            [
                r["num_envs"],
                r["vectorization"],
                r["env_steps_per_s"],
                r["env_steps_per_s"] / base,
                r["ms_per_planner_call"],
                r["planning_share"],
                r["planner_calls"],
            ]
            for r in rows
        ],
    )
    return "\n\n".join(
        [
            "# Vector acting on Pendulum-v1",
            __doc__.split("\n\n")[1].replace("\n", " "),
            table,
            "## Machine",
            machine_md(payload["machine"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--async-envs", type=int, nargs="*", default=[16], help="num_envs also run as AsyncVectorEnv")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per point")
    parser.add_argument("--warmup", type=int, default=5, help="untimed vector steps first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(load_config(CONFIG).threads)
    info = machine_info()
    points = [(n, "sync") for n in args.num_envs] + [(n, "async") for n in args.async_envs]
    results = [measure(n, v, args.seconds, args.warmup) for n, v in points]
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {"machine": info, "config": "configs/pendulum.yaml", "seconds": args.seconds, "results": results}
    write_outputs(args.out, "vector_acting", payload, markdown(payload))


if __name__ == "__main__":
    main()
