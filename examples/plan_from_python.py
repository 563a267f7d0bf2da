"""Load a trained loopwm agent and play real episodes with it from Python.

    loopwm run configs/pendulum.yaml name=pend              # writes runs/pend/checkpoints/latest.pt
    python examples/plan_from_python.py runs/pend/checkpoints/latest.pt --episodes 3

The agent plans with the checkpoint's world model, value and policy prior, and returns actions in the
environment's own units (torques in [-2, 2] for Pendulum), so they go straight into `env.step`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np

import loopwm
from loopwm.envs import make_env


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint of `loopwm run` (or a bare model saved with loopwm.save)")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    agent = loopwm.load_agent(args.checkpoint)
    env = make_env(agent.cfg.env, training=False)  # the real environment the agent was trained on
    returns = []
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        agent.reset()
        total, done, steps = 0.0, False, 0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
            total, done, steps = total + float(reward), terminated or truncated, steps + 1
        returns.append(total)
        print(f"episode {episode}: return {total:.1f} over {steps} steps")
    print(f"mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {args.episodes} episodes")
    env.close()
    return returns


if __name__ == "__main__":
    main()
