"""The markdown of `param_efficiency.json`: one table per protocol and task, means ± std over seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

from common import machine_md, md_table

INTRO = """# Parameter efficiency: loopwm next to an observation-space MLP

`benchmarks/param_efficiency.py`. Every variant of a task is trained on the same random-policy dataset and
train split, for the same number of updates, and scored on the same 256 held-out sequences with the semantics
of `loopwm eval` (`loopwm.analysis.prediction.prediction_errors`): open-loop rollouts from the first observation
with the
logged actions, squared error divided per dimension by the train split's variance and averaged over dimensions
(1.0 = always predicting the mean). Errors are the mean ± std over model seeds (dataset, split and held-out
sequences fixed). FLOPs are 2 × the analytic multiply-adds of one imagined environment step (`loopwm.flops`:
linear maps only). Training time counts the updates only, on one thread of a shared 2-core CPU.

The reconstruction floor is decode(encode(o)) against o: the 1-step error a loopwm model would have if its loop
predicted the encoder's latent exactly; the delta floor (delta decoder only) is o_k + D(E(o_k), E(o_{k+1}))
against o_{k+1}, the same for a delta decoder. The latent error is ‖ẑ_h − E(o_h)‖² over the variance of E(o)
across the batch."""


def spread(values: list[float]) -> str:
    """`mean ± std` (std over seeds, ddof 0), or the single value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{np.mean(values):.3g} ± {np.std(values):.2g}"


def _seeds(variant: dict[str, Any]) -> list[dict[str, Any]]:
    return [variant["seeds"][s] for s in sorted(variant["seeds"], key=int)]


def task_tables(task: str, entry: dict[str, Any], horizons: list[int]) -> list[str]:
    d = entry["dataset"]
    lines = [
        f"### {task} ({d['env']})",
        "",
        f"Dataset: {d['transitions']} random-policy transitions ({d['episodes']} episodes, seed {d['seed']}); "
        f"held-out {d['val_transitions']} transitions ({d['val_episodes']} episodes, split seed "
        f"{d['split_seed']}).",
        "",
    ]
    rows, diag, curves = [], [], []
    for name, v in entry["variants"].items():
        runs = _seeds(v)
        seeds = ",".join(sorted(v["seeds"], key=int))
        errs = [spread([r["errors"][str(h)] for r in runs if str(h) in r["errors"]]) for h in horizons]
        rows.append(
            [
                f"`{name}`",
                runs[0]["parameters"],
                f"{2 * runs[0]['macs_per_step'] / 1e3:.0f}k",
                *errs,
                spread([r["train_seconds"] for r in runs]),
                seeds,
            ]
        )
        if v["kind"] == "loopwm":
            last = [r["curve"][-1] for r in runs]
            diag.append(
                [
                    f"`{name}`",
                    spread([c["recon_floor"] for c in last]),
                    spread([c["delta_floor"] for c in last if "delta_floor" in c]),
                    *[spread([c["latent_error"][str(h)] for c in last]) for h in horizons],
                ]
            )
        points = sorted({c["updates"] for r in runs for c in r["curve"]})
        if len(points) > 1:
            for p in points:
                at = [c for r in runs for c in r["curve"] if c["updates"] == p]
                curves.append([f"`{name}`", p, *[spread([c["errors"][str(h)] for c in at]) for h in horizons]])
    lines += [
        md_table(["variant", "parameters", "FLOPs/step", *[f"err@{h}" for h in horizons], "train s", "seeds"], rows),
        "",
    ]
    if diag:
        lines += [
            "Where the loopwm error sits (final models):",
            "",
            md_table(["variant", "reconstruction floor", "delta floor", *[f"latent err@{h}" for h in horizons]], diag),
            "",
        ]
    if curves:
        lines += [
            "Errors against updates:",
            "",
            md_table(["variant", "updates", *[f"err@{h}" for h in horizons]], curves),
            "",
        ]
    notes = [
        f"- `{name}`: {v['note']}" + (f"; overrides `{' '.join(v['overrides'])}`" if v["overrides"] else "")
        for name, v in entry["variants"].items()
    ]
    commands = sorted({r["command"] for v in entry["variants"].values() for r in _seeds(v) if "command" in r})
    lines += ["Variants:", "", *notes, "", "Commands:", "", *[f"- `{c}`" for c in commands], ""]
    return lines


def markdown(data: dict[str, Any]) -> str:
    lines = [INTRO, ""]
    for pname, proto in data.get("protocols", {}).items():
        s = proto["settings"]
        lines += [
            f"## Protocol `{pname}`: {s['steps']} transitions, {s['updates']} updates",
            "",
            f"The observation-space MLP trains on batches of {s['mlp_batch']} transitions; loopwm on its "
            f"config's batch of sequences. Held-out: {s['sequences']} sequences, seed {s['eval_seed']}.",
            "",
        ]
        for task, entry in proto["tasks"].items():
            lines += task_tables(task, entry, s["horizons"])
    machine = dict(data.get("machine", {}))
    machine.setdefault("load_average_end", "-")
    machine.setdefault("command", "see each task's commands")
    lines += ["## Machine", "", machine_md(machine)]
    return "\n".join(lines) + "\n"
