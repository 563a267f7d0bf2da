"""One loop iteration of the certified core against a plain torch MLP of the same shape, at batch 512.

For T loops we time, interleaved in the same rounds:
  run        core.run(ctx, LoopOptions(loops=T)), ctx prepared beforehand (the loops alone);
  call       core.prepare(e) then core.run(...): one whole forward call, certified weights included;
  mlp        T applications of nn.Sequential(Linear(H, W, bias=False), ReLU, Linear(W, H, bias=False));
  mlp+update T applications of h ← Ā⊙h + d + s·mlp(h, u): the same matmuls and elementwise maths as
             the loop map, written with plain tensors (no residual norms, no trace).
in two modes: `no_grad` (inference) and `grad` (autograd on, forward only, as in training, where the
normalised weights are recomputed on every call). The target is run/T ≤ 1.5 × mlp/T. A fit
call(T) ≈ a + b·T and a count of scaled_bound calls show that the weights cost is paid once
per call, never once per loop.

A second part prices the certificate itself, per forward (every h-path map of the block), against
the plain Gram-chain bound it replaces, which squared W before any rescaling:
  legacy     W / legacy_bound(W) for each map (underflows for tiny W, overflows for huge W);
  robust     what a forward now pays: `certify()` on each map (power-of-two rescaling, the Gram chain
             in float32 with its derived rounding term) plus `LoopCertificate.build` (κ, rounding constants);
  chain f32 / chain f64   the rescaled Gram chain alone, in float32 or in float64.

    .venv/bin/python benchmarks/core_speed.py
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch
from core_speed_report import markdown
from torch import Tensor, nn
from torch.nn import functional as F

import loopwm.lipschitz as lipschitz
from loopwm.certificate import LoopCertificate
from loopwm.config import load_config
from loopwm.exits import LoopOptions
from loopwm.loop import LoopCore

from common import (
    DEFAULT_OUT,
    REPO,
    command,
    interleaved,
    load_average,
    machine_info,
    median,
    paired_ratio,
    write_outputs,
)

CONFIG = REPO / "configs" / "pendulum.yaml"
MODES = ("no_grad", "grad")


def build_core(hidden: int) -> LoopCore:
    """The Pendulum config's loop core, with `model.hidden_dim` set to `hidden`."""
    return LoopCore(load_config(CONFIG, [f"model.hidden_dim={hidden}"]).model)


def mode_context(mode: str) -> contextlib.AbstractContextManager:
    return torch.no_grad() if mode == "no_grad" else torch.enable_grad()


@contextlib.contextmanager
def count_bounds() -> Iterator[list[int]]:
    """Count calls of scaled_bound (the certified weights' cost) inside the block."""
    calls = [0]
    original = lipschitz.scaled_bound

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    with mock.patch.object(lipschitz, "scaled_bound", counted):
        yield calls


def plain_mlp(hidden: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, width, bias=False), nn.ReLU(), nn.Linear(width, hidden, bias=False))


def loop_variants(core: LoopCore, e: Tensor, loops: int) -> dict[str, Callable[[], Any]]:
    """The four timed functions for `loops` iterations (see the module docstring)."""
    hidden, width = core.cfg.hidden_dim, core.block.out.weight.shape[1]
    mlp = plain_mlp(hidden, width)
    ctx = core.prepare(e)
    h0 = torch.randn(e.shape[0], hidden)
    a, d, u, s = torch.rand(hidden), torch.randn_like(h0), torch.randn(e.shape[0], width), torch.rand(())

    def run() -> Tensor:
        return core.run(ctx, options=LoopOptions(loops=loops))[0]

    def call() -> Tensor:
        return core.run(core.prepare(e), options=LoopOptions(loops=loops))[0]

    def mlp_only() -> Tensor:
        h = h0
        for _ in range(loops):
            h = mlp(h)
        return h

    def mlp_update() -> Tensor:
        h = h0
        for _ in range(loops):
            h = a * h + d + s * mlp[2](F.relu(mlp[0](h) + u))
        return h

    return {"run": run, "call": call, "mlp": mlp_only, "mlp+update": mlp_update}


def weight_costs(core: LoopCore, repeats: int) -> dict[str, float]:
    """Median seconds to produce the normalised h-path weights, by path."""
    linears = core.block.linears()

    def fresh() -> list[Tensor]:
        return [lin.effective_weight() for lin in linears]

    with torch.no_grad():
        no_grad = interleaved({"fresh": fresh, "cached": core.effective_weights}, repeats)
    with torch.enable_grad():
        grad = interleaved({"fresh": fresh}, repeats)
    return {
        "no_grad_fresh": median(no_grad["fresh"].wall),
        "no_grad_cached": median(no_grad["cached"].wall),
        "grad_fresh": median(grad["fresh"].wall),
    }


def legacy_bound(weight: Tensor, squarings: int = 4) -> Tensor:
    """The bound before rescaling (Gram matrix of the raw W, normalised only after squaring), for its cost."""
    w = weight.reshape(weight.shape[0], -1)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    log_scale = gram.new_zeros(())
    for i in range(squarings):
        c = gram.abs().sum(1).max().clamp_min(1e-30)
        gram = gram / c
        log_scale = log_scale + torch.log(c) * 2 ** (squarings - i)
        gram = gram @ gram
    top = gram.abs().sum(1).max().clamp_min(1e-30)
    return torch.exp((log_scale + torch.log(top)) / 2 ** (squarings + 1)) * (1 + 1e-4)


def bound_costs(hidden: int, repeats: int) -> dict[str, Any]:
    """Median µs per forward of the certified weights, legacy against robust, and float32 against float64 chains."""
    torch.manual_seed(0)
    core = build_core(hidden)
    linears = core.block.linears()
    retention = core.retention().detach()
    scale = core.block_scale(retention.max()).detach()

    def legacy() -> list[Tensor]:
        return [lin.weight / legacy_bound(lin.weight) for lin in linears]

    def robust() -> Any:
        return LoopCertificate.build(retention, scale, [lin.certify() for lin in linears], core.cfg.activation)

    def chain(dtype: torch.dtype) -> Callable[[], Any]:
        return lambda: [lipschitz.scaled_bound(lin.weight, dtype=dtype) for lin in linears]

    fns = {"legacy": legacy, "robust": robust, "chain_f32": chain(torch.float32), "chain_f64": chain(torch.float64)}
    out: dict[str, Any] = {"hidden": hidden, "shapes": [list(lin.weight.shape) for lin in linears], "modes": {}}
    for mode in MODES:
        with mode_context(mode):
            samples = interleaved(fns, repeats)
        wall = {name: v.wall for name, v in samples.items()}
        cpu = {name: v.cpu for name, v in samples.items()}
        out["modes"][mode] = {
            **{f"{name}_us": 1e6 * median(v) for name, v in wall.items()},
            **{f"{name}_cpu_us": 1e6 * median(v) for name, v in cpu.items()},
            "ratio_robust_vs_legacy": paired_ratio(wall["robust"], wall["legacy"]),
            "ratio_robust_vs_legacy_cpu": paired_ratio(cpu["robust"], cpu["legacy"]),
            "ratio_chain_f64_vs_f32": paired_ratio(wall["chain_f64"], wall["chain_f32"]),
            "ratio_chain_f64_vs_f32_cpu": paired_ratio(cpu["chain_f64"], cpu["chain_f32"]),
        }
        m = out["modes"][mode]
        print(
            f"bound cost hidden {hidden} {mode}: legacy {m['legacy_cpu_us']:.0f} µs, "
            f"robust {m['robust_cpu_us']:.0f} µs CPU (×{m['ratio_robust_vs_legacy_cpu']:.2f}); "
            f"chain f64/f32 ×{m['ratio_chain_f64_vs_f32_cpu']:.2f}",
            flush=True,
        )
    return out


def measure(hidden: int, threads: int, loops: list[int], batch: int, repeats: int) -> dict[str, Any]:
    """Per-loop times, ratios, fit and weight-call counts for one hidden size and thread count."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    core = build_core(hidden)
    e = torch.randn(batch, core.cfg.inject_dim)
    weights = weight_costs(core, repeats)
    result: dict[str, Any] = {
        "hidden": hidden,
        "width": core.block.out.weight.shape[1],
        "threads": threads,
        "weights_s": weights,
        "modes": {},
    }
    for mode in MODES:
        with mode_context(mode):
            fns = {f"{name}@{t}": fn for t in loops for name, fn in loop_variants(core, e, t).items()}
            fns["prepare"] = lambda: core.prepare(e)
            samples = interleaved(fns, repeats)
            counts = {}
            for t in loops:
                with count_bounds() as calls:
                    fns[f"call@{t}"]()
                counts[t] = calls[0]
        rows = []
        for t in loops:
            wall = {name: samples[f"{name}@{t}"].wall for name in ("run", "call", "mlp", "mlp+update")}
            rows.append(
                {
                    "loops": t,
                    **{f"{name}_per_loop_us": 1e6 * median(v) / t for name, v in wall.items()},
                    "ratio_run_vs_mlp": paired_ratio(wall["run"], wall["mlp"]),
                    "ratio_run_vs_mlp_cpu": paired_ratio(samples[f"run@{t}"].cpu, samples[f"mlp@{t}"].cpu),
                    "ratio_call_vs_mlp": paired_ratio(wall["call"], wall["mlp"]),
                    "ratio_run_vs_mlp_update": paired_ratio(wall["run"], wall["mlp+update"]),
                    "bound_calls_per_call": counts[t],
                }
            )
        call_times = np.array([median(samples[f"call@{t}"].wall) for t in loops])
        slope, intercept = np.polyfit(np.array(loops, dtype=float), call_times, 1)
        paid_s = weights["no_grad_cached" if mode == "no_grad" else "grad_fresh"]
        fresh_s = weights[f"{mode}_fresh"]
        result["modes"][mode] = {
            "rows": rows,
            "fit_intercept_us": 1e6 * intercept,
            "fit_slope_us": 1e6 * slope,
            "prepare_us": 1e6 * median(samples["prepare"].wall),
            "weights_per_call_us": 1e6 * paid_s,
            "per_loop_recompute_ratio": median(
                [(r["run_per_loop_us"] + 1e6 * fresh_s) / r["mlp_per_loop_us"] for r in rows]
            ),
        }
        print(
            f"hidden {hidden} threads {threads} {mode}: "
            + ", ".join(
                f"T={r['loops']} run/mlp {r['ratio_run_vs_mlp']:.2f} (CPU {r['ratio_run_vs_mlp_cpu']:.2f})"
                for r in rows
            ),
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timings per point (median reported)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256], help="model.hidden_dim values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--bound-hidden",
        type=int,
        nargs="+",
        default=[128, 512],
        help="model.hidden_dim values for the certificate's cost per forward (one thread)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for core_speed.json/.md")
    args = parser.parse_args()
    info = machine_info()
    results = [measure(h, n, args.loops, args.batch, args.repeats) for n in args.threads for h in args.hidden]
    torch.set_num_threads(1)
    bounds = [bound_costs(h, args.repeats) for h in args.bound_hidden]
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {
        "machine": info,
        "batch": args.batch,
        "repeats": args.repeats,
        "loops": args.loops,
        "config": "configs/pendulum.yaml",
        "results": results,
        "bound_costs": bounds,
    }
    write_outputs(args.out, "core_speed", payload, markdown(payload))


if __name__ == "__main__":
    main()
