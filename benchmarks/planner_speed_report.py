"""The markdown of `planner_speed.json`: decision latency, FLOPs and throughput against the matmul peak."""

from __future__ import annotations

from typing import Any

from planner_variants import variants_section

from common import machine_md, md_table

PENDULUM_TARGET_MS = 10.0
TDMPC2_FRACTION = 0.30  # TD-MPC2's planner on this CPU: ~50 GFLOP/s of a ~170 GFLOP/s peak, 255-268 ms/decision
LATENCY_TARGET_MS = 20.0


def markdown(payload: dict[str, Any]) -> str:
    peaks = payload["matmul_peak_gflops"]
    a, b = payload["configs"]["pendulum"], payload["configs"]["tdmpc2"]
    lines = [
        "# Planner speed",
        "",
        "Median wall-clock latency of `Planner.act` per decision (one environment), untrained models, "
        f"up to {payload['repeats']} decisions (fewer where a point ran past {payload['budget_s']:.0f} s) after "
        f"{payload['warmup']} warm-up ones along a real Pendulum-v1 rollout. "
        "Shares are per-decision medians of time inside `wm.imagine` (every model forward: injection, loops, "
        "coda, reward and continue heads, certified weights), inside `spectral_norm_bound` (part of imagine), "
        "and inside the value and policy-prior networks. CPU ms is the process CPU time per decision (median): "
        "with 1 thread it is the latency net of time the scheduler gave to other processes; with more threads it "
        "also counts threads spinning while they wait. GFLOP/s and the ≤ 20 ms check use wall-clock medians.",
        "",
        "## Machine",
        "",
        machine_md(payload["machine"]),
        "",
        "Matmul peak: median GFLOP/s of float32 `torch.mm` on n×n matrices, measured before and after the "
        "planner runs; the better of the two medians is shown and used:",
        "",
        md_table(
            ["threads", *[f"n = {k}" for k in next(iter(peaks.values()))]], [[n, *p.values()] for n, p in peaks.items()]
        ),
        "",
        "## (a) Default Pendulum config",
        "",
        f"configs/pendulum.yaml: horizon {a['planner']['horizon']}, {a['planner']['iterations']} iterations, "
        f"{a['planner']['samples']} samples, {a['planner']['elites']} elites, {a['planner']['policy_samples']} "
        f"policy samples from a PolicyPrior, ValueFunction at the horizon. Useful work "
        f"{a['flops']['useful_gflop']:.2f} GFLOP per decision "
        f"({a['flops']['model_step_mflop_per_sample']:.2f} MFLOP per model step and sample at "
        f"{a['flops']['loops_per_step']} loops); recomputing the certified "
        f"weights would add {a['flops']['weights_gflop']:.2f} GFLOP over {a['flops']['imagine_calls']} imagine calls, "
        "but under no_grad they come from a cache keyed on the parameters' versions (the 'of which weights' column).",
        "",
        md_table(
            [
                "threads",
                "decisions",
                "median ms",
                "p10 ms",
                "p90 ms",
                "CPU ms",
                f"≤ {LATENCY_TARGET_MS:.0f} ms?",
                "imagine share",
                "of which weights",
                "value share",
                "prior share",
                "GFLOP/s",
                "of best square peak",
            ],
            [
                [
                    n,
                    r["decisions"],
                    r["latency_ms"],
                    r["latency_p10_ms"],
                    r["latency_p90_ms"],
                    r["cpu_ms"],
                    "yes" if r["latency_ms"] <= LATENCY_TARGET_MS else "no",
                    r["share"]["imagine"],
                    r["share"]["weights"],
                    r["share"]["value"],
                    r["share"]["prior"],
                    r["gflops_per_s"],
                    r["fraction_of_best_square_peak"],
                ]
                for n, r in a["threads"].items()
            ],
        ),
        "",
    ]
    for n, r in a["threads"].items():
        if "top_ops" in r:
            lines += [
                f"Top operators by self CPU time, {n} thread(s) (torch.profiler):",
                "",
                md_table(
                    ["op", "calls/decision", "self ms/decision", "share"],
                    [
                        [o["op"], o["calls_per_decision"], o["self_ms_per_decision"], o["self_share"]]
                        for o in r["top_ops"]
                    ],
                ),
                "",
            ]
    target = 1.5 * TDMPC2_FRACTION
    lines += [
        "## (b) TD-MPC2 planning config",
        "",
        "512 samples, horizon 3, 6 iterations, 64 elites; model.latent_dim = 128, model.mlp_dim = 384, "
        "model.hidden_dim = 384 (loop block 384 → 768 → 384, inject_dim 128), model.loops = 4; no policy prior, "
        f"no value. Useful work {b['flops']['useful_gflop']:.1f} GFLOP per decision "
        f"({b['flops']['model_step_mflop_per_sample']:.2f} MFLOP per model step and sample at "
        f"{b['flops']['loops_per_step']} loops); the certified weights "
        f"would add {b['flops']['weights_gflop']:.1f} GFLOP if recomputed (cached under no_grad). Reference: "
        "TD-MPC2's planner on this CPU, 255–268 ms per "
        f"decision, about 50 GFLOP/s = {TDMPC2_FRACTION:.0%} of a ~170 GFLOP/s peak; target ≥ {target:.0%} of peak.",
        "",
        md_table(
            [
                "threads",
                "decisions",
                "median ms",
                "CPU ms",
                "GFLOP/s",
                "GFLOP per CPU-s",
                "of best square peak",
                f"≥ {target:.0%}?",
                "of 1024² peak",
            ],
            [
                [
                    n,
                    r["decisions"],
                    r["latency_ms"],
                    r["cpu_ms"],
                    r["gflops_per_s"],
                    b["flops"]["useful_gflop"] / (r["cpu_ms"] / 1e3),
                    r["fraction_of_best_square_peak"],
                    "yes" if r["fraction_of_best_square_peak"] >= target else "no",
                    r["fraction_of_peak_1024"],
                ]
                for n, r in b["threads"].items()
            ],
        ),
        "",
        "GFLOP per CPU-s: the useful work divided by process CPU time; with 1 thread it is the rate the planner "
        "reaches while it actually runs, to set against the 1-thread peak. The target is judged against the best "
        "square peak, the stricter of the two.",
        "",
    ]
    return "\n".join(lines + variants_section(payload, PENDULUM_TARGET_MS))
