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
    machine_md,
    md_table,
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


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Loop core speed",
        "",
        "One loop iteration of `LoopCore.run(ctx, LoopOptions(loops=T))` at batch "
        f"{payload['batch']}, against a plain torch MLP with the same matmul shapes "
        "(`Linear(H, W, bias=False) → ReLU → Linear(W, H, bias=False)`), measured in the same rounds. "
        f"Medians of {payload['repeats']} timings per point; ratios are medians of per-round ratios. "
        "Target: run/mlp ≤ 1.5.",
        "",
        "- **run**: `core.run` with the step context prepared beforehand (the loops alone).",
        "- **call**: `core.prepare(e)` + `core.run`: one forward call, certified weights included; "
        "`prepare` (retention, injection drive, block context, weights) is also timed alone.",
        "- **mlp+update**: the plain MLP plus the loop map's elementwise update "
        "`h ← Ā⊙h + d + s·W₂ relu(W₁h + u)`, without residual norms or trace bookkeeping.",
        "- **no_grad**: inference; **grad**: autograd enabled, forward only (training), where the "
        "normalised weights are recomputed on each call.",
        "",
        "## Machine",
        "",
        machine_md(payload["machine"]),
        "",
        "## Summary: run/mlp per loop (target ≤ 1.5)",
        "",
        "Ratios of wall-clock time, and of process CPU time (which leaves out time the scheduler gave to other "
        "processes; with 2 threads it includes threads spinning while they wait).",
        "",
        md_table(
            [
                "threads",
                "H → W → H",
                "mode",
                *[f"wall T = {t}" for t in payload["loops"]],
                "wall ≤ 1.5?",
                *[f"CPU T = {t}" for t in payload["loops"]],
                "CPU ≤ 1.5?",
                "bound calls per call",
            ],
            [
                [
                    res["threads"],
                    f"{res['hidden']} → {res['width']} → {res['hidden']}",
                    mode,
                    *[r["ratio_run_vs_mlp"] for r in m["rows"]],
                    "yes" if all(r["ratio_run_vs_mlp"] <= 1.5 for r in m["rows"]) else "no",
                    *[r["ratio_run_vs_mlp_cpu"] for r in m["rows"]],
                    "yes" if all(r["ratio_run_vs_mlp_cpu"] <= 1.5 for r in m["rows"]) else "no",
                    ", ".join(sorted({str(r["bound_calls_per_call"]) for r in m["rows"]})),
                ]
                for res in payload["results"]
                for mode, m in res["modes"].items()
            ],
        ),
        "",
    ]
    for res in payload["results"]:
        lines += [f"## H = {res['hidden']}, W = {res['width']}, {res['threads']} thread(s)", ""]
        w = res["weights_s"]
        lines += [
            f"Certified weights (spectral_norm_bound on every h-path map): "
            f"{1e6 * w['no_grad_fresh']:.0f} µs fresh under no_grad, {1e6 * w['grad_fresh']:.0f} µs with grad, "
            f"{1e6 * w['no_grad_cached']:.1f} µs from the no_grad cache.",
            "",
        ]
        for mode, m in res["modes"].items():
            rows = [
                [
                    r["loops"],
                    r["run_per_loop_us"],
                    r["call_per_loop_us"],
                    r["mlp_per_loop_us"],
                    r["mlp+update_per_loop_us"],
                    r["ratio_run_vs_mlp"],
                    r["ratio_run_vs_mlp_cpu"],
                    r["ratio_call_vs_mlp"],
                    r["ratio_run_vs_mlp_update"],
                    r["bound_calls_per_call"],
                ]
                for r in m["rows"]
            ]
            lines += [
                f"### {mode}",
                "",
                md_table(
                    [
                        "T",
                        "run µs/loop",
                        "call µs/loop",
                        "mlp µs/loop",
                        "mlp+update µs/loop",
                        "run/mlp",
                        "run/mlp (CPU)",
                        "call/mlp",
                        "run/(mlp+update)",
                        "bound calls per call",
                    ],
                    rows,
                ),
                "",
                f"Fit call(T) ≈ a + b·T: a = {m['fit_intercept_us']:.0f} µs, b = {m['fit_slope_us']:.0f} µs/loop; "
                f"`prepare` alone {m['prepare_us']:.0f} µs, of which the weights {m['weights_per_call_us']:.0f} µs "
                f"({'cached' if mode == 'no_grad' else 'recomputed once per call'}). Had fresh weights been computed "
                f"every loop, run/mlp would be about {m['per_loop_recompute_ratio']:.2f}.",
                "",
            ]
    return "\n".join(lines + bound_markdown(payload))


def bound_markdown(payload: dict[str, Any]) -> list[str]:
    """The certificate's cost per forward: legacy against robust weights, float32 against float64 chains."""
    rows = [
        [
            b["hidden"],
            " + ".join("×".join(map(str, s)) for s in b["shapes"]),
            mode,
            m["legacy_us"],
            m["robust_us"],
            m["ratio_robust_vs_legacy"],
            m["legacy_cpu_us"],
            m["robust_cpu_us"],
            m["ratio_robust_vs_legacy_cpu"],
            m["chain_f32_cpu_us"],
            m["chain_f64_cpu_us"],
            m["ratio_chain_f64_vs_f32_cpu"],
        ]
        for b in payload["bound_costs"]
        for mode, m in b["modes"].items()
    ]
    return [
        "## The certificate's cost per forward (one thread)",
        "",
        "Every h-path map of the Pendulum config's block, per forward call. **legacy**: `W / legacy_bound(W)`, the "
        "Gram chain on the raw W (wrong for tiny or huge W). **robust**: `certify()` on each map (power-of-two "
        "rescaling, float32 Gram chain with its derived rounding term, the applied weight and its norm bounds) plus "
        "`LoopCertificate.build` (κ and the rounding constants). **chain f32 / f64**: the rescaled chain alone "
        "(`scaled_bound`) in float32 or float64; the package keeps float32, the cheaper. Medians in µs of wall-clock "
        "and of process CPU time (which leaves out time the scheduler gave to other processes); ratios are medians "
        "of per-round ratios.",
        "",
        md_table(
            [
                "hidden",
                "maps (out×in)",
                "mode",
                "legacy µs",
                "robust µs",
                "robust/legacy",
                "legacy CPU µs",
                "robust CPU µs",
                "robust/legacy CPU",
                "chain f32 CPU µs",
                "chain f64 CPU µs",
                "f64/f32 CPU",
            ],
            rows,
        ),
        "",
    ]


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
