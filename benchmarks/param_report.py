"""The markdown of `param_efficiency.json`: one table per protocol and task, means ± std over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common import machine_md, md_table

INTRO = """# Parameter efficiency: loopwm next to an unshared stack, plain MLP dynamics and an observation-space MLP

`benchmarks/param_efficiency.py`. Every variant of a task is trained on the same random-policy dataset and
train split, for the same number of updates, and scored on the same 256 held-out sequences with the semantics
of `loopwm eval` (`loopwm.analysis.prediction.prediction_errors`): open-loop rollouts from the first observation
with the
logged actions, squared error divided per dimension by the train split's variance and averaged over dimensions
(1.0 = always predicting the mean). Errors are the mean ± std over model seeds (dataset, split and held-out
sequences fixed). Idle parameters are those of the dynamics blocks that a step from the zero start state never
reaches (an unshared stack's first block acts on h = 0 only); they are included in the count. Core parameters are
the dynamics core's alone (loop: retention, injection, blocks, gains and exit gate; or the plain MLP), without the
encoder, prelude, coda and heads that every loopwm variant shares. FLOPs are 2 × the
analytic multiply-adds of one imagined environment step (`loopwm.flops`:
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


def _parameters(run: dict[str, Any]) -> str:
    idle = run.get("idle_parameters")
    return f"{run['parameters']} ({idle} idle)" if idle else str(run["parameters"])


def _matched(m: dict[str, Any] | None) -> str:
    if m is None:
        return ""
    unit = "parameters" if m["by"] == "parameters" else "FLOPs per step"
    cost = m["reference_cost"] * (1 if m["by"] == "parameters" else 2)
    return f"; `model.dynamics_width={m['width']}`, matching {m['reference']}'s {cost:.0f} {unit}"


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
                _parameters(runs[0]),
                runs[0].get("core_parameters", "-"),
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
        md_table(
            [
                "variant",
                "parameters",
                "core parameters",
                "FLOPs/step",
                *[f"err@{h}" for h in horizons],
                "train s",
                "seeds",
            ],
            rows,
        ),
        "",
    ]
    if "figure" in entry:
        lines += [f"![errors against parameters and FLOPs per step]({entry['figure']})", ""]
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
        f"- `{name}`: {v['note']}"
        + (f"; overrides `{' '.join(v['overrides'])}`" if v["overrides"] else "")
        + _matched(_seeds(v)[0].get("matched"))
        for name, v in entry["variants"].items()
    ]
    commands = sorted({r["command"] for v in entry["variants"].values() for r in _seeds(v) if "command" in r})
    lines += ["Variants:", "", *notes, "", "Commands:", "", *[f"- `{c}`" for c in commands], ""]
    return lines


def plot_task(entry: dict[str, Any], horizons: list[int], title: str, path: Path) -> None:
    """One PNG: each variant's held-out error (mean, std over seeds) against parameters and against FLOPs per
    step, one row per horizon, log-log."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator

    fig = Figure(figsize=(10, 3 * len(horizons) + 0.8), layout="constrained")
    axes = fig.subplots(len(horizons), 2, squeeze=False)
    for i, (name, v) in enumerate(entry["variants"].items()):
        runs = _seeds(v)
        x = {"parameters": runs[0]["parameters"], "FLOPs per step": 2 * runs[0]["macs_per_step"]}
        for row, h in zip(axes, horizons):
            errs = [r["errors"][str(h)] for r in runs if str(h) in r["errors"]]
            for ax, value in zip(row, x.values()):
                if errs:
                    ax.errorbar(
                        [value], [np.mean(errs)], yerr=[np.std(errs)], fmt="o", capsize=3, color=f"C{i}", label=name
                    )
    for row, h in zip(axes, horizons):
        for ax, label in zip(row, ["parameters", "FLOPs per step"]):
            ax.set(xscale="log", yscale="log", xlabel=label, ylabel=f"error at {h} step{'s' * (h > 1)}")
            ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # labels within a decade, too
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.xaxis.set_minor_formatter(EngFormatter())
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"held-out error against model size: {title} (mean ± std over seeds)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


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
