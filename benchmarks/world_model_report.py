"""The markdown of `world_model.json`: per environment, the dataset, the fixed-budget training and the held-out
errors under the default and the certified exit."""

from __future__ import annotations

from typing import Any


def markdown(data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    lines = [
        "# World-model benchmark",
        "",
        "Held-out open-loop prediction error after a fixed CPU training budget "
        "(`benchmarks/world_model.py`). Errors are MSE divided per dimension by the *train* split's variance "
        "(1.0 = predicting the train mean). Held-out = whole episodes of the dataset's val split "
        "(train.val_fraction); 256 sampled sequences. Targets: step-1 error at least 5x below the better "
        "baseline; step-50 error below both baselines.",
        "",
        f"Machine: {m.get('nproc')} CPUs, {m.get('cpu_model')}, {m.get('memory_gb')} GB, "
        f"torch {m.get('torch')}, Python {m.get('python')}. Timings are wall clock on a shared machine: the load "
        "average is recorded next to each run, and a load above the CPU count means the budget bought fewer "
        "updates.",
        "",
    ]
    for r in data.get("results", {}).values():
        d, t = r["dataset"], r["training"]
        lines += [
            f"## {r['env']}",
            "",
            f"Command: `{r['command']}`",
            "",
            f"- Dataset `{d['path']}`: {d['transitions']} transitions / {d['episodes']} episodes; "
            f"train {d['train']['transitions']} ({d['train']['episodes']} ep.), held-out "
            f"{d['val']['transitions']} ({d['val']['episodes']} ep.).",
        ]
        for p in d["parts"]:
            extra = ""
            if p["policy"] != "random":
                pl = p["planner"]
                extra = (
                    f"; MPPI samples={pl['samples']}, elites={pl['elites']}, iterations={pl['iterations']}, "
                    f"horizon={pl['horizon']}, noise={p['noise']}"
                )
            lines.append(
                f"  - {p['policy']}: {p['transitions']} transitions, {p['episodes']} episodes, "
                f"{p['num_envs']} envs, seed {p['seed']}, {p['seconds']} s{extra}"
            )
        q = d["quick_model"]
        lines += [
            f"  - quick model for the planner: {q['updates']} updates in {q['train_seconds']} s on the random half",
            f"- Training: `{r['config']}`, budget {t['budget_s'] / 60:g} min of `Trainer.update` wall clock -> "
            f"**{t['updates']} updates** in {t['train_seconds']} s (process CPU {t['train_cpu_seconds']} s); "
            f"load average before/after {t['loadavg_before'][0]:.1f}/{t['loadavg_after'][0]:.1f}.",
            f"- Throughput: **{t['transitions_per_s']:.0f} transitions/s** "
            f"({t['batch_size']} x {t['horizon']} x {t['updates']} / {t['train_seconds']} s); "
            f"peak RSS **{r['peak_rss_mb']:.0f} MB** (whole process, collection included).",
            f"- Checkpoint: `{t['checkpoint']}` (save_run: config, trainer state and replay inside); "
            f"certified kappa {r['eval_default_exit']['kappa']:.4f}.",
            "",
            f"Default exit ({r['eval_default_exit']['exit']}):",
            "",
            "| horizon | model | predict-mean | no-change | best baseline / model | loops |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for h, e in r["eval_default_exit"]["horizons"].items():
            best = min(e["predict_mean"], e["no_change"])
            lines.append(
                f"| {h} | {e['model']:.4f} | {e['predict_mean']:.4f} | {e['no_change']:.4f} | "
                f"{best / e['model']:.2f}x | {e['loops_mean']:.2f} |"
            )
        v = r["eval_default_exit"]["verdict"]
        lines += [
            "",
            f"Targets: step 1 >= 5x below the better baseline: "
            f"**{'met' if v.get('step1_target_met') else 'NOT met'}** "
            f"({v.get('step1_factor_below_best_baseline', float('nan')):.2f}x); "
            f"step 50 below both baselines: **{'met' if v.get('step50_below_both') else 'NOT met'}**.",
            "",
            "Certified exit (every tolerance tried is listed):",
            "",
            "| tol | step-1 loops min/mean/max (distinct) | Spearman(loops, step-1 error) | err@1 | err@10 | "
            "err@50 | mean loops @50 |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in r["eval_certified_exit"]:
            s, hs = c["step1_loops"], c["horizons"]
            sp = c["loops_error_spearman_step1"]
            lines.append(
                f"| {c['tol']:g} | {s['min']:.0f}/{s['mean']:.2f}/{s['max']:.0f} ({s['distinct']}) | "
                f"{'n/a (loops constant)' if sp != sp else f'{sp:.3f}'} | "
                + " | ".join(f"{hs[h]['model']:.4f}" if h in hs else "-" for h in ("1", "10", "50"))
                + f" | {hs[max(hs, key=int)]['loops_mean']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)
