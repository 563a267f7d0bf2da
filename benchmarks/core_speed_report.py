"""The markdown of `core_speed.json`: loop iteration cost against a plain MLP, and the certificate's cost."""

from __future__ import annotations

from typing import Any

from common import machine_md, md_table


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
