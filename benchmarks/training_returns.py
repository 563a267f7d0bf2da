"""Training-episode returns of `loopwm run` folders side by side, in windows of agent steps.

One run gets its learning curve in windows. Runs of one game and seed that differ in a few config keys (listed
in the report, read from each run's config.yaml) are compared window by window at the same agent steps, so a run
still in progress can be set against a finished one up to where it has got. The last window a run has finished
is marked. Returns are those of the episodes the agent played while learning (its `episode/return` rows), the
quantity DreamerV3 reports for Atari 100k; evaluation returns (`eval/return_mean`) are listed where the run has
them.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/training_returns.py \
        --run dynamics=runs/pong --run reinforce=runs/reinforce/pong --window 10000 --name atari_actor_pong
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, command, load_average, machine_info, machine_md, md_table, write_outputs  # noqa: E402

IGNORED_KEYS = {"name", "run_dir", "resume"}


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a torn last line, from a run killed mid-write, is skipped)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{folder}: no metrics.jsonl; expected a `loopwm run` folder")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_differences(folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The config keys whose values differ between the runs: {key: {label: value}} (a missing key is None)."""
    configs = {label: flatten(yaml.safe_load((f / "config.yaml").read_text()) or {}) for label, f in folders.items()}
    keys = sorted(set().union(*configs.values()) - IGNORED_KEYS)
    return {
        key: {label: cfg.get(key) for label, cfg in configs.items()}
        for key in keys
        if len({json.dumps(cfg.get(key)) for cfg in configs.values()}) > 1
    }


def summarize(returns: list[float]) -> dict[str, Any]:
    """Mean, standard error and count of some episode returns (no mean for none, no SE for one)."""
    n = len(returns)
    mean = statistics.fmean(returns) if n else None
    se = statistics.stdev(returns) / math.sqrt(n) if n > 1 else None
    return {"episodes": n, "mean": mean, "se": se}


def windows(rows: list[dict[str, Any]], window: int, total: int, scalars: list[str]) -> list[dict[str, Any]]:
    """Training-episode returns by window of `window` agent steps up to `total`, with the window's mean of each
    logged scalar in `scalars` (None where the run logged none); a window the run has not reached the end of
    is marked incomplete."""
    episodes = [(r["step"], r["episode/return"]) for r in rows if "episode/return" in r]
    reached = max((r["step"] for r in rows), default=0)
    out = []
    for lo in range(0, total, window):
        hi = min(lo + window, total)
        inside = [r for r in rows if lo < r["step"] <= hi]
        returns = [ret for step, ret in episodes if lo < step <= hi]
        means = {}
        for key in scalars:
            values = [r[key] for r in inside if key in r]
            means[key] = statistics.fmean(values) if values else None
        out.append({"from": lo, "to": hi, "complete": reached >= hi, **summarize(returns), "scalars": means})
    return out


def measure_run(folder: Path, window: int, total: int, scalars: list[str]) -> dict[str, Any]:
    """One run's windows, evaluations, last step and wall-clock time so far."""
    rows = read_metrics(folder)
    timed = [r for r in rows if "perf/elapsed_s" in r]
    return {
        "folder": str(folder),
        "steps": max((r["step"] for r in rows), default=0),
        "elapsed_s": timed[-1]["perf/elapsed_s"] if timed else None,
        "elapsed_at_step": timed[-1]["step"] if timed else None,
        "evaluations": [
            {"step": r["step"], "mean": r["eval/return_mean"], "std": r.get("eval/return_std")}
            for r in rows
            if "eval/return_mean" in r
        ],
        "windows": windows(rows, window, total, scalars),
    }


def config_value(value: Any) -> str:
    """A config value as shown in the report; None is a key the run's config.yaml does not have."""
    return "(absent)" if value is None else json.dumps(value)


def cell(w: dict[str, Any]) -> str:
    if w["mean"] is None:
        return ""
    se = f" ± {w['se']:.1f}" if w["se"] is not None else ""
    return f"{w['mean']:.1f}{se} ({w['episodes']}{'' if w['complete'] else ', so far'})"


def scalar_cell(w: dict[str, Any], key: str) -> str:
    value = w["scalars"][key]
    return "" if value is None else f"{value:.3g}{'' if w['complete'] else ' (so far)'}"


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]], diffs: dict, info: dict) -> str:
    labels = list(runs)
    lines = [f"# Training-episode returns: {', '.join(labels)}", "", __doc__.split("\n\n")[1].strip(), ""]
    lines += ["## Machine", "", machine_md(info), ""]
    lines += ["## Runs", ""]
    rows = [
        [
            label,
            f"`{r['folder']}`",
            r["steps"],
            f"{r['elapsed_s']:.0f} s at step {r['elapsed_at_step']}" if r["elapsed_s"] is not None else "",
        ]
        for label, r in runs.items()
    ]
    lines += [md_table(["run", "folder", "agent steps so far", "wall-clock time (last logged)"], rows), ""]
    if diffs:
        lines += ["Config keys that differ:", ""]
        shown = [[f"`{k}`", *(config_value(v[lb]) for lb in labels)] for k, v in diffs.items()]
        lines += [md_table(["key", *labels], shown)]
        lines += [""]
    lines += [
        f"## Training-episode return per {args.window:,} agent steps",
        "",
        "Mean ± standard error (episodes ending in the window; 'so far' where the run has not reached its end).",
        "",
    ]
    table = [
        [f"{w['from']:,}–{w['to']:,}", *(cell(runs[lb]["windows"][i]) for lb in labels)]
        for i, w in enumerate(next(iter(runs.values()))["windows"])
        if any(runs[lb]["windows"][i]["episodes"] for lb in labels)
    ]
    lines += [md_table(["agent steps", *labels], table), ""]
    for key in args.scalars:
        values = [[f"{w['from']:,}–{w['to']:,}", *(scalar_cell(runs[lb]["windows"][i], key) for lb in labels)]
                  for i, w in enumerate(next(iter(runs.values()))["windows"])]  # fmt: skip
        if any(any(v for v in row[1:]) for row in values):
            lines += [
                f"## `{key}`, mean of the logged values per window",
                "",
                md_table(["agent steps", *labels], values),
            ]
            lines += [""]
    evals = [[lb, e["step"], f"{e['mean']:.1f}", f"{e['std']:.1f}"] for lb, r in runs.items() for e in r["evaluations"]]
    if evals:
        lines += ["## Evaluations", "", md_table(["run", "step", "mean return", "std"], evals), ""]
    return "\n".join(lines)


def parse_run(parser: argparse.ArgumentParser, text: str) -> tuple[str, Path]:
    label, _, folder = text.partition("=")
    if not label or not folder:
        parser.error(f"--run {text!r}: expected LABEL=RUN_FOLDER")
    if not (Path(folder) / "metrics.jsonl").is_file():
        parser.error(f"--run {text!r}: {folder} has no metrics.jsonl; expected a `loopwm run` folder")
    return label, Path(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_FOLDER, once per run")
    parser.add_argument("--window", type=int, default=10_000, help="agent steps per window")
    parser.add_argument("--total", type=int, default=100_000, help="agent steps the windows cover")
    parser.add_argument(
        "--scalars",
        nargs="*",
        default=["prior/prior_entropy", "prior/prior_grad_norm"],
        help="metrics.jsonl keys averaged per window (default: the actor's entropy and gradient norm)",
    )
    parser.add_argument("--name", default="training_returns", help="output file stem")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    folders = dict(parse_run(parser, text) for text in args.run)
    if len(folders) < len(args.run):
        parser.error("--run: give each run a label of its own")
    if args.window < 1 or args.total < args.window:
        parser.error(f"--window {args.window} --total {args.total}: expected 1 <= window <= total")
    info = machine_info()
    runs = {label: measure_run(folder, args.window, args.total, args.scalars) for label, folder in folders.items()}
    diffs = config_differences(folders)
    info.update(load_average_end=load_average(), command=command())
    payload = {"machine": info, "window": args.window, "total": args.total, "config_differences": diffs, "runs": runs}
    write_outputs(args.out, args.name, payload, report(args, runs, diffs, info))
    return payload


if __name__ == "__main__":
    main()
