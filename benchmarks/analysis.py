"""Summarise `loopwm analyze` outputs and copy their figures into docs/figures/<name>/.

Usage (after running `loopwm analyze CKPT --out benchmarks/out/analysis/<name> --compare PAPER_CKPT`):

    python benchmarks/analysis.py benchmarks/out/analysis/pendulum benchmarks/out/analysis/halfcheetah

Prints one compact table of the key numbers of each report.json and copies its PNGs to docs/figures/<name>/.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def key_numbers(report: dict) -> dict:
    c, v, a = report["certificate"], report["convergence"], report["agreement"]
    sw, o, er = report["loop_sweep"], report["oscillation"], report["effective_rank"]
    pi, lh = report["path_independence"], report["long_horizon"]
    fit = sw["fit"]
    out = {
        "kappa": c["kappa"],
        "ratio_median": c["ratio_median"],
        "ratio_max": c["ratio_max"],
        "jac_norm_max": c["jacobian_norm_max"],
        "jac_radius_max": c["jacobian_radius_max"],
        "loops_to_3pct": v["loops_to_3pct_median"],
        "bound_valid": v["bound_valid_fraction"],
        "bound_tightness": v["bound_tightness_median"],
        "depth_median": a["depth_median"],
        "T_max": len(a["loops"]),
        "auroc_residual": a["auroc_residual"],
        "auroc_agreement": a["auroc_agreement"],
        "certified_mean_loops": a["certified_mean_loops"],
        "certified_error": a["certified_error"],
        "spearman_loops_error": a["spearman_loops_error"],
        "err_T1": sw["latent_error"][0],
        "err_T0": sw["latent_error"][sw["train_loops"] - 1],
        "err_Tmax": sw["latent_error"][-1],
        "best_T": fit["best_T"],
        "best_err": fit["best_err"],
        "tau": fit["tau"],
        "regresses": fit["regresses"],
        "regression": fit["regression"],
        "obs_best_T": sw["obs_fit"]["best_T"],
        "obs_regresses": sw["obs_fit"]["regresses"],
        "cos_median": o["cosine_median"],
        "neg_cos_frac": o["negative_cosine_fraction"],
        "fixed_point_frac": o["fixed_point_fraction"],
        "period_counts": o["period_counts"],
        "state_rank_last": er["state_rank"][-1],
        "state_rank_1": er["state_rank"][0],
        "state_dim": er["state_dim"],
        "readout_rank_last": er["readout_rank"][-1],
        "target_rank": er["target_rank"],
        "spread_op": pi["spread_at_operating"],
        "spread_final": pi["spread_final"],
        "spearman_spread_error": pi["spearman_spread_error"],
        "auroc_spread": pi["auroc_spread"],
        "err_zero/warm/random": [pi["error_zero_start"], pi["error_warm_start"], pi["error_random_start"]],
        "lh_norm_max": lh["model"]["state_norm_max"],
        "lh_finite": lh["model"]["finite"],
        "lh_rate": lh["model"]["lyapunov_median"],
        "lh_err_last": lh["model"]["latent_error"]["median"][-1],
        "seconds": report["meta"]["seconds"],
        "section_seconds": report["meta"]["section_seconds"],
    }
    if "compare" in lh:
        out.update(
            cmp_kappa=lh["compare_kappa"],
            cmp_norm_max=lh["compare"]["state_norm_max"],
            cmp_finite=lh["compare"]["finite"],
            cmp_rate=lh["compare"]["lyapunov_median"],
            cmp_err_last=lh["compare"]["latent_error"]["median"][-1],
        )
    out["pareto"] = [
        (name, r["setting"], round(r["mean_loops"], 2), r["error"])
        for name, rows in report["pareto"].items()
        for r in rows
        if r["pareto"]
    ]
    return out


def main(dirs: list[str]) -> None:
    for d in map(Path, dirs):
        report = json.loads((d / "report.json").read_text())
        dest = ROOT / "docs" / "figures" / d.name
        dest.mkdir(parents=True, exist_ok=True)
        for png in sorted(d.glob("*.png")):
            shutil.copy2(png, dest / png.name)
        print(f"== {d.name}")
        for k, v in key_numbers(report).items():
            print(f"  {k}: {v}")


if __name__ == "__main__":
    main(sys.argv[1:])
