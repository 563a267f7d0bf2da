"""`loopwm plot RUN [RUN ...]`: learning curves of runs as one PNG.

Left: evaluation return against environment steps. Runs whose resolved configs agree on everything but
their name, seed and bookkeeping are one group: a line for the mean across its runs and a band for
their spread (± one standard deviation, or the single run's own evaluation spread). Right: the loss
curves of `metrics.jsonl`, averaged within each group.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import yaml

# Keys that differ between repeats of one experiment without changing it.
BOOKKEEPING = ("name", "seed", "run_dir", "resume", "threads", "device")


@dataclass
class RunCurves:
    """What one run folder logged: its config, evaluations and loss scalars by step."""

    folder: Path
    config: dict
    evals: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (mean, std) return
    losses: dict[str, dict[int, float]] = field(default_factory=dict)  # "loss/x" -> step -> value

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.folder.name)


def read_run(folder: Union[str, Path]) -> RunCurves:
    """Read `config.yaml` and `metrics.jsonl` of a run folder; a folder that is not a run raises."""
    folder = Path(folder)
    metrics, config_path = folder / "metrics.jsonl", folder / "config.yaml"
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {str(folder)!r} does not exist")
    if not metrics.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a run folder: it has no metrics.jsonl")
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    run = RunCurves(folder, config if isinstance(config, dict) else {})
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{str(metrics)!r} line {number} is not a metrics record: {line[:80]!r}") from None
        if row.get("eval/return_mean") is not None:
            std = row.get("eval/return_std")
            run.evals[step] = (float(row["eval/return_mean"]), float(std) if std is not None else 0.0)
        for key, value in row.items():
            if key.startswith("loss/") and value is not None and math.isfinite(value):
                run.losses.setdefault(key, {})[step] = float(value)
    return run


def group_key(config: dict) -> str:
    """A run's config without its bookkeeping keys, as canonical text: equal keys mean repeats."""
    return json.dumps({k: v for k, v in config.items() if k not in BOOKKEEPING}, sort_keys=True, default=str)


def group_runs(runs: Sequence[RunCurves]) -> dict[str, list[RunCurves]]:
    """Runs grouped by config, each group labelled by the common prefix of its names (and its size)."""
    groups: dict[str, list[RunCurves]] = defaultdict(list)
    for run in runs:
        groups[group_key(run.config)].append(run)
    labelled = {}
    for members in groups.values():
        names = [run.name for run in members]
        label = _common_prefix(names) if len(members) > 1 else names[0]
        labelled[f"{label} ({len(members)} run{'s' if len(members) > 1 else ''})"] = members
    return labelled


def _common_prefix(names: Sequence[str]) -> str:
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("-_.") or names[0]


def mean_and_spread(
    series: Sequence[dict[int, float]], own_spread: Sequence[dict[int, float]] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, spread, count) across series at every step any of them has.

    The spread is the standard deviation across the series that have the step; where only one has
    it, that series' own spread (e.g. its evaluation std) when given, else 0.
    """
    steps = np.array(sorted(set().union(*series)), dtype=np.int64)
    mean, spread, count = (np.zeros(len(steps)) for _ in range(3))
    for i, step in enumerate(steps):
        values = [s[step] for s in series if step in s]
        mean[i], count[i] = np.mean(values), len(values)
        if len(values) > 1:
            spread[i] = np.std(values)
        elif own_spread:
            spread[i] = next(o[step] for s, o in zip(series, own_spread) if step in s)
    return steps, mean, spread, count


def plot_runs(folders: Sequence[Union[str, Path]], out: Union[str, Path]) -> dict[str, Any]:
    """Draw the runs' learning and loss curves into the PNG `out`; returns what was drawn per group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"loopwm plot needs matplotlib: pip install 'loopwm[analysis]' ({exc})") from exc
    if not folders:
        raise ValueError("loopwm plot needs at least one run folder")
    groups = group_runs([read_run(f) for f in folders])
    fig, (ax_ret, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    summary: dict[str, Any] = {}
    for g, (label, members) in enumerate(groups.items()):
        colour = colours[g % len(colours)]
        drawn: dict[str, Any] = {"runs": [str(m.folder) for m in members]}
        evals = [{s: v[0] for s, v in m.evals.items()} for m in members]
        if any(evals):
            own = [{s: v[1] for s, v in m.evals.items()} for m in members]
            steps, mean, spread, _ = mean_and_spread([e for e in evals if e], [o for e, o in zip(evals, own) if e])
            ax_ret.plot(steps, mean, color=colour, marker="o", ms=3, label=label)
            ax_ret.fill_between(steps, mean - spread, mean + spread, color=colour, alpha=0.2)
            drawn["eval"] = {"steps": steps.tolist(), "mean": mean.tolist(), "spread": spread.tolist()}
        keys = sorted({k for m in members for k in m.losses})
        for k, key in enumerate(keys):
            steps, mean, _, _ = mean_and_spread([m.losses[key] for m in members if key in m.losses])
            ax_loss.plot(
                steps,
                mean,
                color=colours[k % len(colours)],
                ls=styles[g % len(styles)],
                label=f"{key[5:]} · {label}" if len(groups) > 1 else key[5:],
            )
            drawn.setdefault("losses", {})[key] = len(steps)
        summary[label] = drawn
    if not any("eval" in d for d in summary.values()):
        ax_ret.text(0.5, 0.5, "no evaluations logged", ha="center", va="center", transform=ax_ret.transAxes)
    ax_ret.set(xlabel="environment steps", ylabel="eval return", title="evaluation return (mean ± spread)")
    ax_loss.set(xlabel="step", ylabel="loss", title="training losses (metrics.jsonl)")
    if any("losses" in d for d in summary.values()):
        ax_loss.set_yscale("symlog", linthresh=1e-3)
        ax_loss.legend(fontsize=7, ncol=2)
    if ax_ret.lines:
        ax_ret.legend(fontsize=8)
    for ax in (ax_ret, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return summary
