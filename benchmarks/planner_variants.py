"""Planners side by side in one run (planner_speed.py part (c)): decisions timed in turn, each along its own rollout.

Each contender is a planner (a loopwm one with some `planner.*` loop options, or the same planner on
another model) acting in its own copy of the environment. `common.interleaved` times one decision of
each per round, so load on the machine falls on all of them alike and their ratios stay fair.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from plain_dynamics import PlainWorldModel

from loopwm.agents import Planner, build_planner
from loopwm.config import Config, load_config
from loopwm.envs.factory import action_from_model, make_env
from loopwm.flops import linear_macs, step_macs

from common import interleaved, md_table, median, paired_ratio

CERTIFIED = ["planner.loops=null", "planner.exit=certified", "planner.exit_tol=1.0", "planner.max_loops=4"]
VARIANTS = {  # label -> planner overrides, for (c); "default" is the model's own loops, whatever the config plans with
    "default": ["planner.loops=null"],
    "planner.loops=3": ["planner.loops=3"],
    "planner.loops=2": ["planner.loops=2"],
    "planner.loops=1": ["planner.loops=1"],
    "warm_start=time, loops=1": ["planner.warm_start=time", "planner.loops=1"],
    "warm_start=time, certified": ["planner.warm_start=time", *CERTIFIED],
}
CERTIFIED_STEPS = {  # label -> overrides, planned with `Planner(certify=True)`: the cost of every step's bound
    "planner.loops=2, every step certified": ["planner.loops=2"],
}
PLAIN = "plain MLP, TD-MPC2 size"


@dataclass
class Contender:
    """One planner acting along a real rollout; `decide` plans one decision and steps the environment."""

    label: str
    env: Any
    planner: Any
    overrides: list[str] = field(default_factory=list)
    loops: list[float] = field(default_factory=list)  # mean loops per imagined step, per decision

    def __post_init__(self) -> None:
        self.obs, _ = self.env.reset(seed=0)
        self.planner.reset()
        self.t0 = True

    def decide(self) -> None:
        action = self.planner.act(self.obs, t0=self.t0)
        self.loops.append(self.planner.last_stats["loops"])
        self.obs, _, terminated, truncated, _ = self.env.step(action_from_model(action, self.env.action_space))
        self.t0 = terminated or truncated
        if self.t0:
            self.obs, _ = self.env.reset()


def compare(contenders: list[Contender], repeats: int, warmup: int, baseline: str) -> dict[str, dict[str, Any]]:
    """Median wall and CPU ms per decision, mean loops per imagined step, and each contender's per-round ratio
    to the one labelled `baseline`."""
    fns: dict[str, Callable[[], None]] = {c.label: c.decide for c in contenders}
    samples = interleaved(fns, repeats, warmup)
    base = samples[baseline]
    out = {}
    for c in contenders:
        s = samples[c.label]
        out[c.label] = {
            "overrides": c.overrides,
            "latency_ms": 1e3 * median(s.wall),
            "cpu_ms": 1e3 * median(s.cpu),
            "loops_per_step": sum(c.loops[-repeats:]) / repeats,
            "wall_ratio": paired_ratio(s.wall, base.wall),
            "cpu_ratio": paired_ratio(s.cpu, base.cpu),
        }
    return out


def variants_md(rows: dict[str, dict[str, Any]], baseline: str, target_ms: Optional[float] = None) -> str:
    """A markdown table of `compare`'s result."""
    headers = ["planner", "loops per imagined step", "median ms", "CPU ms", f"wall × {baseline}", f"CPU × {baseline}"]
    if target_ms is not None:
        headers.append(f"≤ {target_ms:.0f} ms?")
    table = []
    for label, r in rows.items():
        row = [label, r["loops_per_step"], r["latency_ms"], r["cpu_ms"], r["wall_ratio"], r["cpu_ratio"]]
        if target_ms is not None:
            row.append("yes" if r["latency_ms"] <= target_ms else "no")
        table.append(row)
    return md_table(headers, table)


def plain_planner(cfg: Config, seed: int) -> tuple[Any, PlainWorldModel, Planner]:
    """Environment, the plain TD-MPC2-sized model (latent and width from `cfg.model`) and the same planner."""
    torch.manual_seed(seed)
    env = make_env(cfg.env, seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    plain = PlainWorldModel(obs_dim, act_dim, latent=cfg.model.latent_dim, width=cfg.model.mlp_dim).eval()
    return env, plain, build_planner(cfg, plain, seed=seed)


def run_variants(
    config: Path, base: list[str], with_prior_value: bool, with_plain: bool, args: argparse.Namespace, build: Callable
) -> dict[str, Any]:
    """Every loop option in `VARIANTS` and `CERTIFIED_STEPS` on `config` with overrides `base` (and the plain
    model) timed in turn, at each of `args.threads`; `build(cfg, with_prior_value, seed, **planner_kwargs)`
    makes (env, model, planner)."""
    contenders, models = [], []
    options = [(label, overrides, {}) for label, overrides in VARIANTS.items()]
    options += [(label, overrides, {"certify": True}) for label, overrides in CERTIFIED_STEPS.items()]
    for label, overrides, kwargs in options:
        env, wm, planner = build(load_config(config, base + overrides), with_prior_value, 0, **kwargs)
        contenders.append(Contender(label, env, planner, overrides))
        models.append(wm)
    one_loop = step_macs(models[0], 1)  # multiply-adds per imagined step and sample at one loop from zero, by part
    out: dict[str, Any] = {"threads": {}, "loopwm_one_loop_macs": one_loop}
    if with_plain:
        env, plain, planner = plain_planner(load_config(config, base), 0)
        contenders.append(Contender(PLAIN, env, planner))
        out["plain"] = {
            "parameters": sum(p.numel() for p in plain.parameters()),
            "step_mflop_per_sample": 2 * linear_macs(plain.dynamics, plain.reward) / 1e6,
            "macs": {"dynamics": linear_macs(plain.dynamics), "reward": linear_macs(plain.reward)},
        }
    for n in args.threads:
        torch.set_num_threads(n)
        out["threads"][n] = compare(contenders, args.repeats, args.warmup, PLAIN if with_plain else "default")
        for label, r in out["threads"][n].items():
            print(f"{label} threads {n}: {r['latency_ms']:.1f} ms, {r['loops_per_step']:.2f} loops/step", flush=True)
    for c in contenders:
        c.env.close()
    return out


def variants_section(payload: dict[str, Any], target_ms: float) -> list[str]:
    """(c): the loop options, and the plain model, against the default in the same run."""
    va, vb = payload["variants"]["pendulum"], payload["variants"]["tdmpc2"]
    plain = vb["plain"]
    lines = [
        "## (c) Loop options and a plain model, side by side",
        "",
        "Each row is one planner acting along its own Pendulum-v1 rollout; one decision of each is timed per round, "
        "in rotating order, so the machine's load falls on all alike; ratios are per-round medians against the "
        "default (the model's own 4 loops from zero). `planner.loops=L`: L loops from zero; `warm_start=time`: each "
        "imagined step's loop starts from the previous step's exit state (the first from the elites' mean); "
        f"certified: {', '.join(CERTIFIED)}; 'every step certified': the planner also computes each imagined "
        "step's certified bound, which it otherwise skips where nothing reads it (the actions are the same). "
        "The certified rows' loop counts are those of untrained models; see "
        "[planner_loops.md](planner_loops.md) for trained ones and for what each option does to predictions "
        "and actions.",
        "",
        f"Default Pendulum config (target ≤ {target_ms:.0f} ms on one thread):",
        "",
    ]
    for n, rows in va["threads"].items():
        lines += [f"{n} thread(s):", "", variants_md(rows, "default", target_ms), ""]
    lines += [
        f"TD-MPC2's planning config, and {PLAIN}: TD-MPC2's encoder, dynamics and two-hot reward MLPs (LayerNorm + "
        f"Mish, width {payload['tdmpc2_width']}, latent {payload['tdmpc2_latent']}, SimNorm latents, no loop; "
        f"{plain['parameters']:,} parameters, {plain['step_mflop_per_sample']:.2f} MFLOP per imagined step and "
        "sample, continue = 1) through the same MPPI planner (benchmarks/plain_dynamics.py):",
        "",
    ]
    m, p = vb["loopwm_one_loop_macs"], plain
    around = m["prelude"] + m["injection"] + m["coda"]
    for n, rows in vb["threads"].items():
        best = min((k for k in rows if k != PLAIN), key=lambda k: rows[k]["cpu_ms"])
        r = rows[best]
        verdict = "meets" if max(r["wall_ratio"], r["cpu_ratio"]) <= 1.0 else "misses"
        lines += [
            f"{n} thread(s): the cheapest loopwm option ({best}, {r['loops_per_step']:.2f} loops per imagined step) "
            f"takes {r['latency_ms']:.0f} ms ({r['cpu_ms']:.0f} ms CPU) against the plain model's "
            f"{rows[PLAIN]['latency_ms']:.0f} ms ({rows[PLAIN]['cpu_ms']:.0f} ms CPU): {r['wall_ratio']:.2f}× its wall "
            f"time and {r['cpu_ratio']:.2f}× its CPU time per round, so it {verdict} the target (no dearer in both).",
            "",
            f"Multiply-adds per imagined step and sample: loopwm at one loop from zero {m['total'] / 1e3:.0f}k "
            f"(loop {m['loops'] / 1e3:.0f}k; prelude, injection and coda {around / 1e3:.0f}k; heads "
            f"{m['heads'] / 1e3:.0f}k), the plain model {sum(p['macs'].values()) / 1e3:.0f}k (dynamics "
            f"{p['macs']['dynamics'] / 1e3:.0f}k, reward {p['macs']['reward'] / 1e3:.0f}k): the parts around the "
            "loop alone outweigh the plain dynamics MLP.",
            "",
            variants_md(rows, "plain"),
            "",
        ]
    return lines
