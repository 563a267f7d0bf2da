"""Imagined transitions per second of `VectorWorldModelEnv` against real HalfCheetah-v5 steps per second.

The model is configs/halfcheetah.yaml's (latent 64, width 128, 4 loops; untrained: throughput does not
depend on the weights under the fixed exit). Its continue head is pinned to "continue", as HalfCheetah
never terminates, so episodes end at the 1,000-step time limit and autoreset costs what it would in use.
Each N steps the batched env with random actions in the real bounds (start observations: 256 real
resets); the real environment is stepped with random actions in the same run, interleaved in rounds.
At N = 1024 the batched env is also stepped with fewer loops per step (`--loops`, passed as
`options=LoopOptions(loops=L)`), as `planner.loops` does for planning.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vector_env.py --threads 2 --loops 2 1
    .venv/bin/python benchmarks/vector_env.py --smoke --out /tmp/bench     # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopwm.config import load_config  # noqa: E402
from loopwm.envs import VectorWorldModelEnv, WorldModelEnv, make_env  # noqa: E402
from loopwm.exits import LoopOptions  # noqa: E402
from loopwm.flops import linear_macs, step_macs  # noqa: E402
from loopwm.world_model import WorldModel  # noqa: E402

from common import (  # noqa: E402
    DEFAULT_OUT,
    REPO,
    command,
    load_average,
    machine_info,
    machine_md,
    matmul_peak,
    md_table,
    median,
    write_outputs,
)


def stepper(env: Any, actions: np.ndarray) -> Callable[[], int]:
    """A function that takes len(actions) steps of `env` (resetting a single env when it ends)."""
    vector = isinstance(env, gym.vector.VectorEnv)

    def run() -> int:
        for a in actions:
            if vector:
                env.step(a)
            else:
                _, _, terminated, truncated, _ = env.step(a)
                if terminated or truncated:
                    env.reset()
        return len(actions)

    return run


def rate(fn: Callable[[], int], batch: int) -> float:
    """Transitions per second of one call of `fn` (which returns how many batched steps it took)."""
    start = time.perf_counter()
    steps = fn()
    return batch * steps / (time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loops", type=int, nargs="*", default=[], help="also step N=1024 with these loop counts")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (numbers mean nothing)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    cfg = load_config(REPO / "configs" / "halfcheetah.yaml", ["device=cpu"])
    sizes = (1, 8) if args.smoke else (1, 64, 1024, 4096)
    budget = 64 if args.smoke else 4096 * 12  # imagined transitions per round and size
    real = make_env(cfg.env, seed=0)
    starts = np.stack([real.reset(seed=i)[0] for i in range(16 if args.smoke else 256)])
    wm = WorldModel.from_config(cfg, real.observation_space, real.action_space).eval()
    with torch.no_grad():
        wm.continue_head[-1].bias.fill_(20.0)
    rng = np.random.default_rng(0)
    low, high = real.action_space.low, real.action_space.high

    def actions(steps: int, n: Optional[int]) -> np.ndarray:
        shape = (steps, *(() if n is None else (n,)), *real.action_space.shape)
        return rng.uniform(low, high, shape).astype(np.float32)

    timed: dict[str, tuple[Callable[[], int], int]] = {}
    real_steps = 50 if args.smoke else 4000
    real.reset(seed=0)
    timed["real HalfCheetah-v5"] = (stepper(real, actions(real_steps, None)), 1)
    single = WorldModelEnv(wm, reset_obs=starts, observation_space=real.observation_space)
    single.reset(seed=0)
    timed["WorldModelEnv"] = (stepper(single, actions(max(8, budget // 40), None)), 1)
    for n in sizes:
        for decode in (True, False) if n >= 1024 or args.smoke else (True,):
            env = VectorWorldModelEnv(
                wm,
                n,
                reset_obs=starts,
                observation_space=real.observation_space,
                max_episode_steps=1000,
                decode_obs=decode,
            )
            env.reset(seed=0)
            steps = max(4, min(budget // n, 1000 if n > 1 else budget // 40))
            timed[f"VectorWorldModelEnv N={n}{'' if decode else ' (latent obs)'}"] = (
                stepper(env, actions(steps, n)),
                n,
            )
    loops: dict[str, int] = {name: cfg.model.loops for name in timed if not name.startswith("real")}
    wide = sizes[-1] if args.smoke else 1024
    for count in args.loops:
        if not 1 <= count <= cfg.model.max_loops:
            raise SystemExit(f"--loops {count}: expected 1..model.max_loops={cfg.model.max_loops}")
        env = VectorWorldModelEnv(
            wm,
            wide,
            reset_obs=starts,
            observation_space=real.observation_space,
            max_episode_steps=1000,
            options=LoopOptions(exit="fixed", loops=count),
        )
        env.reset(seed=0)
        name = f"VectorWorldModelEnv N={wide}, {count} loop{'s' if count > 1 else ''}"
        timed[name] = (stepper(env, actions(max(4, min(budget // wide, 1000)), wide)), wide)
        loops[name] = count
    rates: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(args.rounds):
        for name, (fn, n) in timed.items():
            rates[name].append(rate(fn, n))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
    peak = matmul_peak(args.threads, repeats=3 if args.smoke else 10, sizes=(256,))["256"]
    macs = step_macs(wm, cfg.model.loops)["total"]
    decoded_macs = macs + linear_macs(wm.decoder)
    row_macs = {
        name: step_macs(wm, count)["total"] + (0 if "latent" in name else linear_macs(wm.decoder))
        for name, count in loops.items()
    }
    real_rate = median(rates["real HalfCheetah-v5"])
    rows, results = [], []
    for name, values in rates.items():
        m = median(values)
        gflops = None if name.startswith("real") else 2 * m * row_macs[name] / 1e9
        results.append(
            {
                "env": name,
                "loops": None if name.startswith("real") else loops[name],
                "transitions_per_s": m,
                "rounds": values,
                "vs_real": m / real_rate,
                "model_gflop_per_s": gflops,
            }
        )
        rows.append(
            [
                name,
                "" if gflops is None else loops[name],
                f"{m:,.0f}",
                f"{m / real_rate:.2f}×",
                "" if gflops is None else f"{gflops:.1f}",
            ]
        )
    key = "VectorWorldModelEnv N=1024"
    target = {"n": 1024, "ratio": next((r["vs_real"] for r in results if r["env"] == key), None), "goal": 20.0}
    info.update(load_average_end=load_average(), command=command(), threads=args.threads)
    payload = {
        "machine": info,
        "smoke": args.smoke,
        "model": {
            "config": "configs/halfcheetah.yaml",
            "latent_dim": cfg.model.latent_dim,
            "hidden_dim": cfg.model.hidden_dim,
            "loops": cfg.model.loops,
        },
        "macs_per_transition": {"latent_obs": macs, "decoded": decoded_macs},
        "matmul_peak_gflop_per_s_256": peak,
        "results": results,
        "target": target,
    }
    ceiling = peak * 1e9 / (2 * decoded_macs)  # transitions/s if every multiply-add ran at the matmul peak
    target["ceiling_vs_real"] = ceiling / real_rate
    verdict = (
        "n/a (smoke run)"
        if target["ratio"] is None
        else f"{target['ratio']:.1f}× the real environment at N = 1024 (target ≥ 20×): "
        f"{'met' if target['ratio'] >= 20 else 'not met'}. Even with every multiply-add at the matmul "
        f"peak the model would step {ceiling:,.0f} transitions/s, {ceiling / real_rate:.1f}× the real "
        "environment: the ratio is set by the model's arithmetic, not by the environment around it"
    )
    fewer = [r for r in results if r["env"].startswith(f"VectorWorldModelEnv N={wide}, ")]
    target["fewer_loops"] = {str(r["loops"]): r["vs_real"] for r in fewer}
    if fewer and not args.smoke:
        verdict += "; with fewer loops per step: " + ", ".join(
            f"{r['loops']} loop{'s' if r['loops'] > 1 else ''} {r['vs_real']:.1f}× "
            f"({'met' if r['vs_real'] >= 20 else 'not met'})"
            for r in fewer
        )
    markdown = "\n\n".join(
        [
            "# VectorWorldModelEnv throughput",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "## Machine\n\n" + machine_md(info) + f"\n- torch threads: {args.threads}",
            f'Median over {args.rounds} interleaved rounds; "transitions/s" counts one environment step of one '
            "environment (N per batched step).",
            f"One imagined transition is {decoded_macs / 1e3:.0f}k multiply-adds with the observation decoded "
            f"({macs / 1e3:.0f}k without; `loopwm.flops`); the model GFLOP/s column is what the batched forward "
            f"sustains, against a float32 matmul peak of {peak:.0f} GFLOP/s (256×256, same threads, same run).",
            md_table(["environment", "loops", "transitions/s", "vs real", "model GFLOP/s"], rows),
            f"Result: {verdict}.",
        ]
    )
    write_outputs(args.out, "vector_env", payload, markdown)
    return payload


if __name__ == "__main__":
    main()
