"""Planner latency per decision, where the time goes, and achieved GFLOP/s against this machine's matmul peak.

(a) The default Pendulum config (configs/pendulum.yaml: MPPI with its horizon, iterations, samples and
    elites, policy samples from a PolicyPrior, a ValueFunction at the horizon). Target: ≤ 20 ms per
    decision on 2 cores.
(b) TD-MPC2's planning config on the same task: 512 samples, horizon 3, 6 iterations, 64 elites,
    latent 128, MLP width 384 (model.latent_dim=128, model.mlp_dim=384, model.hidden_dim=384, so the
    loop block is 384 → 768 → 384; model.loops 4), without prior or value. Reference: TD-MPC2's own planner
    on this CPU reached about 30% of the matmul peak; target ≥ 1.5 × that fraction.
(c) Loop options side by side (`planner.*`: fewer loops, warm starts, the certified exit), each timed in turn
    with the default in the same run, with their mean loops per imagined step; for (b) also against a plain
    MLP world model of TD-MPC2's size through the same planner (benchmarks/plain_dynamics.py). Targets: the
    default Pendulum decision ≤ 10 ms on one thread; a loopwm decision at (b) no dearer than the plain model's.

Models are untrained: the cost of a decision with a fixed loop count does not depend on the weights, but
the loops an adaptive exit (certified) spends do, so its rows here only show what each loop costs; the loops
trained models spend, and what each option does to predictions and actions, are in planner_loops.md.
Observations come from a real environment rollout driven by the planner. FLOPs are counted analytically:
2·rows·in·out for every linear map on the decision's path; elementwise work and the certified-weight
computation are excluded from the useful count (the latter is reported separately). The peak is the best
median rate of float32 torch.mm on n×n matrices (n = 256, 512, 1024) at the same thread count, measured in
the same run; the 1024×1024 rate alone is also shown, as it can fall well below the smaller sizes here.

    .venv/bin/python benchmarks/planner_speed.py --repeats 20
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import numpy as np
import torch
from planner_speed_report import TDMPC2_FRACTION, markdown
from planner_variants import run_variants
from torch.profiler import ProfilerActivity, profile

import loopwm.lipschitz as lipschitz
from loopwm.agents import Planner, PolicyPrior, ValueFunction, build_planner
from loopwm.config import Config, load_config
from loopwm.envs.factory import action_from_model, make_env
from loopwm.flops import linear_macs, step_macs
from loopwm.world_model import WorldModel

from common import (
    DEFAULT_OUT,
    REPO,
    command,
    load_average,
    machine_info,
    matmul_peak,
    median,
    write_outputs,
)

CONFIG = REPO / "configs" / "pendulum.yaml"
TDMPC2_OVERRIDES = [
    "planner.samples=512",
    "planner.horizon=3",
    "planner.iterations=6",
    "planner.elites=64",
    "model.latent_dim=128",
    "model.mlp_dim=384",
    "model.hidden_dim=384",
    "planner.loops=null",  # the model's own 4 loops, not the 2 configs/pendulum.yaml plans with
]


def bound_flops(wm: WorldModel) -> int:
    """FLOPs of one set of certified weights: the Gram matrix and its squarings, per h-path map."""
    total = 0
    for lin in wm.core.block.linears():
        rows, cols = lin.weight.shape
        k = min(rows, cols)
        total += 2 * k * k * max(rows, cols) + 4 * 2 * k**3  # spectral_norm_bound's default 4 squarings
    return total


def decision_flops(wm: WorldModel, planner: Planner) -> dict[str, float]:
    """Analytic FLOPs of one decision for one environment, split into useful work and weight overhead; each
    imagined step counts the loops the planner runs (its fixed `planner.loops`, else the model's own)."""
    cfg, options = planner.cfg, planner.loop_options
    fixed = options is not None and options.exit == "fixed" and isinstance(options.loops, int)
    loops = options.loops if fixed else wm.cfg.loops
    step = step_macs(wm, loops)["total"]
    value = linear_macs(planner.value.net) if planner.value is not None else 0
    total = linear_macs(wm.encoder) + cfg.iterations * cfg.samples * (cfg.horizon * step + value)
    imagine_calls = cfg.iterations
    if planner.prior is not None:
        p = planner.policy_samples
        total += cfg.horizon * p * linear_macs(planner.prior.net) + (cfg.horizon - 1) * p * step
        imagine_calls += cfg.horizon - 1
    return {
        "useful_gflop": 2 * total / 1e9,
        "model_step_mflop_per_sample": 2 * step / 1e6,
        "loops_per_step": loops,
        "weights_gflop": imagine_calls * bound_flops(wm) / 1e9,
        "imagine_calls": imagine_calls,
    }


def build(cfg: Config, with_prior_value: bool, seed: int, **planner_kwargs: Any) -> tuple[Any, WorldModel, Planner]:
    """Environment, untrained world model and planner for `cfg` (`planner_kwargs` go to the planner)."""
    torch.manual_seed(seed)
    env = make_env(cfg.env, seed)
    wm = WorldModel.from_config(cfg, env.observation_space, env.action_space).eval()
    value = prior = None
    if with_prior_value:
        value = ValueFunction(wm.latent_dim, cfg.agent)
        prior = PolicyPrior(wm.latent_dim, wm.action_dim, wm.discrete, cfg.agent)
    planner = build_planner(
        cfg, wm, value=value, prior=prior, seed=seed, exploration=cfg.agent.exploration_std, **planner_kwargs
    )
    return env, wm, planner


class Timers:
    """Seconds spent inside wrapped callables, accumulated per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


@contextlib.contextmanager
def instrumented(wm: WorldModel, planner: Planner, timers: Timers) -> Iterator[None]:
    """Time model forwards (wm.imagine), the certified weights inside them, the value net and the prior net."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(wm, "imagine", timers.wrap("imagine", wm.imagine)))
        stack.enter_context(
            mock.patch.object(lipschitz, "spectral_norm_bound", timers.wrap("weights", lipschitz.spectral_norm_bound))
        )
        for name in ("value", "prior"):
            fn: Optional[Callable] = getattr(planner, name)
            if fn is not None:
                stack.enter_context(mock.patch.object(planner, name, timers.wrap(name, fn)))
        yield


def decisions(env: Any, wm: WorldModel, planner: Planner, repeats: int, warmup: int, budget_s: float) -> dict[str, Any]:
    """Time up to `repeats` decisions along a real rollout, warm-up included in `budget_s` (past it, stop
    once 3 are timed); per-decision wall time, process CPU time and shares of the instrumented parts."""
    timers = Timers()
    obs, _ = env.reset(seed=0)
    planner.reset()
    latency, cpu, shares = [], [], {k: [] for k in ("imagine", "weights", "value", "prior")}
    t0, deadline = True, time.perf_counter() + budget_s
    with instrumented(wm, planner, timers):
        for i in range(warmup + repeats):
            if len(latency) >= 3 and time.perf_counter() > deadline:
                break
            start, start_cpu = time.perf_counter(), time.process_time()
            action = planner.act(obs, t0=t0)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            parts = timers.take()
            if i >= warmup:
                latency.append(elapsed)
                cpu.append(elapsed_cpu)
                for k in shares:
                    shares[k].append(parts.get(k, 0.0) / elapsed)
            obs, _, terminated, truncated, _ = env.step(action_from_model(action, env.action_space))
            t0 = terminated or truncated
            if t0:
                obs, _ = env.reset()
    return {
        "decisions": len(latency),
        "latency_ms": 1e3 * median(latency),
        "cpu_ms": 1e3 * median(cpu),
        "latency_p10_ms": 1e3 * float(np.percentile(latency, 10)),
        "latency_p90_ms": 1e3 * float(np.percentile(latency, 90)),
        "share": {k: median(v) for k, v in shares.items()},
    }


def top_ops(env: Any, planner: Planner, n_decisions: int, rows: int = 8) -> list[dict[str, Any]]:
    """The operators with the most self CPU time over a few decisions (torch.profiler)."""
    obs, _ = env.reset(seed=1)
    planner.act(obs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_decisions):
            planner.act(obs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "calls_per_decision": e.count / n_decisions,
            "self_ms_per_decision": e.self_cpu_time_total / 1e3 / n_decisions,
            "self_share": e.self_cpu_time_total / total,
        }
        for e in events[:rows]
    ]


def run_config(
    name: str, cfg: Config, with_prior_value: bool, args: argparse.Namespace, profile: bool
) -> dict[str, Any]:
    """Latency, shares and throughput of one planner config at each thread count."""
    env, wm, planner = build(cfg, with_prior_value, cfg.seed)
    flops = decision_flops(wm, planner)
    out: dict[str, Any] = {
        "name": name,
        "flops": flops,
        "prior_and_value": with_prior_value,
        "planner": dataclasses.asdict(cfg.planner),
        "threads": {},
    }
    for n in args.threads:
        torch.set_num_threads(n)
        res = decisions(env, wm, planner, args.repeats, args.warmup, args.budget_s)
        res["gflops_per_s"] = flops["useful_gflop"] / (res["latency_ms"] / 1e3)
        if profile and n in args.profile_threads and args.profile_decisions:
            res["top_ops"] = top_ops(env, planner, args.profile_decisions)
        out["threads"][n] = res
        print(f"{name} threads {n}: {res['latency_ms']:.1f} ms/decision, {res['gflops_per_s']:.1f} GFLOP/s", flush=True)
    env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed decisions per point (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        help="seconds per (config, threads) point after which timing stops (keeps >= 3 decisions)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--profile-decisions", type=int, default=5, help="decisions profiled for (a); 0 skips")
    parser.add_argument("--profile-threads", type=int, nargs="+", default=[1], help="thread counts profiled for (a)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--name", default="planner_speed", help="stem of the JSON and markdown files")
    args = parser.parse_args()
    info = machine_info()
    before = {n: matmul_peak(n, args.repeats) for n in args.threads}
    configs = {
        "pendulum": run_config("pendulum", load_config(CONFIG), True, args, profile=True),
        "tdmpc2": run_config("tdmpc2", load_config(CONFIG, TDMPC2_OVERRIDES), False, args, profile=False),
    }
    variants = {
        "pendulum": run_variants(CONFIG, [], True, False, args, build),
        "tdmpc2": run_variants(CONFIG, TDMPC2_OVERRIDES, False, True, args, build),
    }
    after = {n: matmul_peak(n, args.repeats) for n in args.threads}
    peaks = {n: {k: max(before[n][k], after[n][k]) for k in before[n]} for n in args.threads}  # the better median
    for res in configs.values():
        for n, r in res["threads"].items():
            r["fraction_of_peak_1024"] = r["gflops_per_s"] / peaks[n]["1024"]
            r["fraction_of_best_square_peak"] = r["gflops_per_s"] / max(peaks[n].values())
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {
        "machine": info,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
        "config": "configs/pendulum.yaml",
        "tdmpc2_overrides": TDMPC2_OVERRIDES,
        "tdmpc2_reference_fraction": TDMPC2_FRACTION,
        "matmul_peak_gflops": peaks,
        "matmul_peak_before": before,
        "matmul_peak_after": after,
        "configs": configs,
        "variants": variants,
        "tdmpc2_latent": 128,
        "tdmpc2_width": 384,
    }
    write_outputs(args.out, args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
