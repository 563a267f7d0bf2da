"""Which loop options planning should use: what fewer loops, warm starts and the certified exit do to a trained
model's imagined rollouts, to the planner's actions and to returns, next to the loops they spend.

(1) Imagined rollouts: `--sequences` real Pendulum-v1 transitions of 3 uniformly random actions from fixed
    reset seeds. Per option: mean loops per imagined step, |reward error| and latent RMS error per step
    against the truth (the model's encoding of the real next observation), and |reward − the default's|.
    `warm_start=time` chains each step's loop from the previous step's exit state (step 0 from zero here: the
    elites' mean it starts from in the planner does not exist outside it); the other warm starts need a planner.
(2) Decisions: `--episodes` real trajectories of `--decisions` steps driven by the default planner; every
    option plans from the same states with the same sampling seed per decision, carrying its own warm start.
    |Δ action| (model units, [−1, 1]) against the default, next to the default itself with another sampling
    seed: the planner's own noise, the scale any option's difference is judged on.
(3) Returns: `--episodes` full episodes per option from the same reset seeds (deterministic actions).

The run folder is any trained Pendulum run; its value function and policy prior are used when it has them.
Every timing is process CPU time on one thread.

    loopwm run configs/pendulum.yaml seed=10 agent.total_steps=1500 agent.eval_every=1500 name=pend-s10
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/planner_loops.py runs/pend-s10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from planner_variants import VARIANTS

from loopwm.agents.planning_agent import PlanningAgent, planning_parts
from loopwm.checkpoint import load_run
from loopwm.config import Config, apply_overrides, from_dict, to_dict
from loopwm.envs.factory import action_from_model, make_env
from loopwm.exits import LoopOptions, planner_loop_options
from loopwm.world_model import WorldModel

from common import DEFAULT_OUT, command, load_average, machine_info, machine_md, md_table, median, write_outputs

STUDY = {
    **VARIANTS,
    "warm_start=time, loops=2": ["planner.warm_start=time", "planner.loops=2"],
    "warm_start=elite, loops=1": ["planner.warm_start=elite", "planner.loops=1"],
    "warm_start=elite, loops=2": ["planner.warm_start=elite", "planner.loops=2"],
    "warm_start=iteration, loops=2": ["planner.warm_start=iteration", "planner.loops=2"],
}
RESEED = "default, another sampling seed"
HORIZON = 3


def sequences(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations [n, H+1, 3], model-unit actions [H, n, 1] and rewards [H, n] of random-action Pendulum steps."""
    env, rng = gym.make("Pendulum-v1"), np.random.default_rng(0)
    obs, actions, rewards = [], [], []
    for i in range(n):
        o, _ = env.reset(seed=1000 + i)
        os, acts, rews = [o], [], []
        for _ in range(HORIZON):
            a = rng.uniform(-1.0, 1.0, size=1).astype(np.float32)
            o, r, *_ = env.step(2.0 * a)
            os.append(o)
            acts.append(a)
            rews.append(r)
        obs.append(os)
        actions.append(acts)
        rewards.append(rews)
    as_t = lambda x: torch.tensor(np.array(x), dtype=torch.float32)  # noqa: E731
    return as_t(obs), as_t(actions).transpose(0, 1), as_t(rewards).T


@torch.no_grad()
def rollouts(wm: WorldModel, cfg: Config, n: int) -> dict[str, dict[str, Any]]:
    """(1): prediction errors of imagined rollouts under each option that works outside a planner."""
    obs, actions, rewards = sequences(n)
    z0 = wm.encode(obs[:, 0])
    truth = wm.encode(obs.reshape(-1, obs.shape[-1])).view(n, HORIZON + 1, -1).transpose(0, 1)[1:]
    options = {"fixed point (certified, tol 1e-4)": (LoopOptions(exit="certified", tol=1e-4, max_loops=200), False)}
    for label, overrides in STUDY.items():
        planner = from_dict(apply_overrides(to_dict(cfg), overrides)).planner
        if planner.warm_start in ("none", "time"):
            options[label] = (planner_loop_options(wm.cfg, planner), planner.warm_start == "time")
    default = wm.imagine(z0, actions, decode="none")
    out = {}
    for label, (opts, chain) in options.items():
        start = time.process_time()
        res = wm.imagine(z0, actions, decode="none", options=opts, chain=chain)
        out[label] = {
            "loops": float(res.loops.float().mean()),
            "cpu_ms": 1e3 * (time.process_time() - start),
            "reward_error": (res.rewards - rewards).abs().mean(1).tolist(),
            "latent_rms": (res.latents[1:] - truth).pow(2).mean(-1).sqrt().mean(1).tolist(),
            "reward_vs_default": float((res.rewards - default.rewards).abs().mean()),
        }
    return out


def agent_for(run: Any, overrides: list[str]) -> PlanningAgent:
    """The run's model, value and prior behind a planner with `overrides`."""
    cfg = from_dict(apply_overrides(to_dict(run.config), overrides))
    value, prior, planner = planning_parts(cfg, run.model, seed=0)
    state = run.agent or {}
    for part, name in ((value, "value"), (prior, "prior")):
        if part is not None and name in state:
            part.load_state_dict(state[name])
    return PlanningAgent(run.model, planner, value, prior, cfg=cfg)


@torch.no_grad()
def decisions(run: Any, episodes: int, steps: int) -> dict[str, dict[str, Any]]:
    """(2): each option's actions along trajectories the default planner drives, against the default's."""
    labels = ["default", RESEED, *[k for k in STUDY if k != "default"]]
    agents = {k: agent_for(run, STUDY.get(k, [])) for k in labels}
    env = make_env(run.config.env, 0)
    stats = {k: {"diff": [], "cpu": [], "loops": []} for k in labels}
    for ep in range(episodes):
        obs, _ = env.reset(seed=100 + ep)
        for agent in agents.values():
            agent.reset()
        for t in range(steps):
            actions = {}
            for label, agent in agents.items():
                agent.planner.gen.manual_seed(1000 * ep + t + (77 if label == RESEED else 0))
                start = time.process_time()
                actions[label] = agent.planner.model_action(obs, eval_mode=True, t0=t == 0)
                stats[label]["cpu"].append(time.process_time() - start)
                stats[label]["loops"].append(agent.planner.last_stats["loops"])
                stats[label]["diff"].append(float(np.abs(actions[label] - actions["default"]).max()))
            obs, *_ = env.step(action_from_model(actions["default"], env.action_space))
    return {
        k: {
            "cpu_ms": 1e3 * median(s["cpu"]),
            "loops": float(np.mean(s["loops"])),
            "action_diff_mean": float(np.mean(s["diff"])),
            "action_diff_p90": float(np.percentile(s["diff"], 90)),
        }
        for k, s in stats.items()
    }


@torch.no_grad()
def returns(run: Any, episodes: int, max_steps: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """(3): episode returns per option from the same reset seeds (episodes cut at `max_steps` if given)."""
    out = {}
    env = make_env(run.config.env, 0)
    for label, overrides in STUDY.items():
        agent, rets, cpu, steps = agent_for(run, overrides), [], 0.0, 0
        torch.manual_seed(0)  # the policy prior samples from the global generator
        for ep in range(episodes):
            obs, _ = env.reset(seed=500 + ep)
            agent.reset()
            total, done = 0.0, False
            while not done and (max_steps is None or steps < max_steps * (ep + 1)):
                start = time.process_time()
                action = agent.act(obs)
                cpu += time.process_time() - start
                obs, reward, terminated, truncated, _ = env.step(action)
                total, done, steps = total + float(reward), terminated or truncated, steps + 1
            rets.append(total)
        out[label] = {"returns": rets, "mean": float(np.mean(rets)), "cpu_ms": 1e3 * cpu / steps}
    return out


def markdown(payload: dict[str, Any]) -> str:
    roll, dec, ret = payload["rollouts"], payload["decisions"], payload["returns"]
    fmt = lambda xs: " / ".join(f"{x:.4f}" for x in xs)  # noqa: E731
    noise = dec[RESEED]["action_diff_mean"]
    return "\n".join(
        [
            "# Loop options for planning",
            "",
            f"What each `planner.*` loop option does to a trained model's imagined rollouts, to the planner's actions "
            f"and to returns, next to the loops it spends. Model: `{payload['run']}` ({payload['run_note']}). "
            "Protocol: benchmarks/planner_loops.py's docstring; CPU times are process CPU time on one thread.",
            "",
            "## Machine",
            "",
            machine_md(payload["machine"]),
            "",
            f"## (1) Imagined rollouts ({payload['sequences']} sequences, {HORIZON} steps)",
            "",
            md_table(
                ["option", "loops per step", "|reward error| steps 1/2/3", "latent RMS error", "|reward − default|"],
                [
                    [k, r["loops"], fmt(r["reward_error"]), fmt(r["latent_rms"]), r["reward_vs_default"]]
                    for k, r in roll.items()
                ],
            ),
            "",
            f"## (2) Decisions ({payload['episodes']} trajectories × {payload['decisions_per_trajectory']} decisions)",
            "",
            f"The default planner with another sampling seed moves the action by {noise:.3f} on average: the noise "
            "floor for every row below.",
            "",
            md_table(
                ["option", "loops per imagined step", "CPU ms", "|Δ action| mean", "p90", "mean / sampling noise"],
                [
                    [
                        k,
                        r["loops"],
                        r["cpu_ms"],
                        r["action_diff_mean"],
                        r["action_diff_p90"],
                        r["action_diff_mean"] / noise,
                    ]
                    for k, r in dec.items()
                ],
            ),
            "",
            f"## (3) Returns ({payload['episodes']} episodes per option, reset seeds 500…)",
            "",
            md_table(
                ["option", "mean return", "per episode", "CPU ms per decision"],
                [[k, r["mean"], ", ".join(f"{x:.0f}" for x in r["returns"]), r["cpu_ms"]] for k, r in ret.items()],
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained Pendulum run folder or checkpoint")
    parser.add_argument("--note", default="", help="how the run was made, for the report")
    parser.add_argument("--sequences", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--decisions", type=int, default=40, help="decisions per trajectory in (2)")
    parser.add_argument("--return-steps", type=int, default=None, help="cut (3)'s episodes (default: full ones)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="planner_loops")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run)
    run.model.eval()
    if run.config is None or run.config.env.id != "Pendulum-v1":
        raise SystemExit(f"{args.run}: expected a Pendulum-v1 run folder (with its config)")
    info = machine_info()
    payload = {
        "machine": info,
        "run": str(args.run),
        "run_note": args.note,
        "sequences": args.sequences,
        "episodes": args.episodes,
        "decisions_per_trajectory": args.decisions,
        "study": STUDY,
        "rollouts": rollouts(run.model, run.config, args.sequences),
        "decisions": decisions(run, args.episodes, args.decisions),
        "returns": returns(run, args.episodes, args.return_steps),
    }
    info["load_average_end"] = load_average()
    info["command"] = command()
    write_outputs(args.out, args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
