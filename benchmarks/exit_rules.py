"""Exit rules on trained models: the loops each spends against its 1- and 10-step held-out error.

Each model (`--model NAME=PATH`, a run folder or checkpoint) is scored on the held-out episodes of `--data`
(a run's own `ReplayBuffer.split(train.val_fraction, seed)`, so a model trained on the dataset is scored on episodes
it never saw; `split(0.1, seed=0)` for a bare checkpoint; errors normalised by the train split's variance) with
`loopwm.analysis.prediction.prediction_errors`, once per setting:
- fixed loop counts (`--fixed`);
- the agreement exit (`exit=agreement`: stop once the readout moved by at most tol in the last loop) at `--agreement`
  tolerances;
- the certified exit (`exit=certified`: stop once the certified distance to the fixed point is at most tol) at
  `--certified` tolerances;
- for a model with an error head (`model.error_head`, trained by `train.w_error`), the relative exit
  (`exit=relative`: stop once that distance is at most tol × the error the head predicts for the sample) at
  `--relative` tolerances.
Each setting runs from every start in `--starts`: `cold` starts each imagined step's loop from zeros, `warm` from
the previous step's exit state (`WorldModel.imagine(chain=True)`; the first step starts cold).
Per setting: mean loops per imagined step over the first 10 steps, the 1- and 10-step errors, Spearman(loops used,
error) at step 1, and the AUROC with which readout disagreement (under the agreement exit), the certified bound and
the error head's prediction flag the top-10% step-1 errors. The summary takes the cheapest adaptive setting whose 1-
and 10-step errors are within 1% of the best that any fixed count reaches, and the loops it saves against the
cheapest fixed count within that 1% (and against the fixed count with the lowest 1-step error).

    .venv/bin/python benchmarks/exit_rules.py --data benchmarks/out/param_efficiency/pendulum-random-20000-s0.npz \
        --model s0=benchmarks/out/control/pendulum-s0-recipe --name exit_rules_pendulum
    .venv/bin/python benchmarks/exit_rules.py --smoke --out /tmp/er      # seconds: a tiny model and dataset
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import loopwm
from loopwm.analysis.prediction import prediction_errors
from loopwm.checkpoint import load_run
from loopwm.exits import LoopOptions
from loopwm.replay import ReplayBuffer
from loopwm.world_model import WorldModel

from common import DEFAULT_OUT, command, load_average, machine_info, machine_md, md_table, write_outputs

HORIZONS = (1, 10)
SLACK = 0.01  # "at most 1% higher error"


def settings(args: argparse.Namespace, head: bool = True) -> list[tuple[str, float, LoopOptions]]:
    """(rule, setting, options) for every fixed count and tolerance asked for; the relative exit only with
    an error `head`."""
    out = [("fixed", float(t), LoopOptions(exit="fixed", loops=t)) for t in args.fixed]
    for rule, tols in (("agreement", args.agreement), ("certified", args.certified)):
        out += [(rule, tol, LoopOptions(exit=rule, tol=tol, max_loops=args.max_loops)) for tol in tols]
    if head:
        out += [
            ("relative", t, LoopOptions(exit="relative", rel_tol=t, max_loops=args.max_loops)) for t in args.relative
        ]
    return out


def score(wm: WorldModel, val: ReplayBuffer, train: ReplayBuffer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per setting: loops, errors and depth statistics on the same held-out sequences."""
    stats = train.stats()
    rows = []
    runs = [(start, *s) for start in dict.fromkeys(args.starts) for s in settings(args, head=wm.has_error_head)]
    for start, rule, setting, options in runs:
        with torch.no_grad():
            res = prediction_errors(
                wm,
                val,
                HORIZONS,
                args.sequences,
                seed=0,
                obs_var=stats["obs_std"].pow(2),
                obs_mean=stats["obs_mean"],
                options=options,
                chain=start == "warm",
            )
        depth = res["depth_step1"]
        rows.append(
            {
                "start": start,
                "rule": rule,
                "setting": setting,
                "mean_loops": res["horizons"]["10"]["loops_mean"],
                "errors": {str(h): res["horizons"][str(h)]["model"] for h in HORIZONS},
                "spearman_loops_error": depth["spearman_loops_error"],
                "auroc_agreement": depth.get("auroc_agreement"),
                "auroc_bound": depth.get("auroc_bound"),
                "auroc_head": depth.get("auroc_head"),
            }
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The loops the cheapest adaptive setting saves against fixed counts, at the same accuracy bar.

    The bar is the best error any fixed count reaches, per horizon, plus `SLACK`. Against two references: the
    fixed count with the lowest 1-step error, and the cheapest fixed count that clears the bar too (what a user
    would pick, and the fair comparison: where extra loops stop helping, the lowest error sits at a needlessly
    high count)."""
    fixed = [r for r in rows if r["rule"] == "fixed"]
    bar = {h: (1 + SLACK) * min(r["errors"][h] for r in fixed) for h in fixed[0]["errors"]}

    def clears(r: dict[str, Any]) -> bool:
        return all(r["errors"][h] <= bar[h] for h in bar)

    lowest = min(fixed, key=lambda r: (r["errors"]["1"], r["mean_loops"]))
    cheapest = min((r for r in fixed if clears(r)), key=lambda r: r["mean_loops"], default=None)
    chosen = min((r for r in rows if r["rule"] != "fixed" and clears(r)), key=lambda r: r["mean_loops"], default=None)

    def saving(ref: Optional[dict[str, Any]]) -> Optional[float]:
        return None if chosen is None or ref is None else 1 - chosen["mean_loops"] / ref["mean_loops"]

    return {
        "bar": bar,
        "lowest_fixed": lowest["setting"],
        "lowest_fixed_start": lowest["start"],
        "cheapest_fixed": None if cheapest is None else cheapest["setting"],
        "cheapest_fixed_start": None if cheapest is None else cheapest["start"],
        "best_adaptive": None if chosen is None else {k: chosen[k] for k in ("start", "rule", "setting", "mean_loops")},
        "saving_vs_lowest": saving(lowest),
        "saving_vs_cheapest": saving(cheapest),
        "saving_target_met": (saving(cheapest) or 0.0) >= 0.4,
    }


def smoke_model(out: Path) -> tuple[Path, Path]:
    """A tiny untrained model, with a random error head, and a small dataset of a stable linear system, saved
    under `out`."""
    import gymnasium as gym

    from loopwm.config import from_dict

    rng = np.random.default_rng(0)
    data = ReplayBuffer((3,), 1, 10_000)
    for _ in range(20):
        x, obs, actions = rng.normal(size=3), [], []
        for _ in range(12):
            obs.append(x)
            actions.append(rng.uniform(-1, 1, size=1))
            x = 0.9 * x + 0.3 * actions[-1][0]
        obs.append(x)
        done = np.eye(12, dtype=bool)[-1]
        data.add_episode(np.array(obs, np.float32), np.array(actions, np.float32), np.zeros(12, np.float32),
                         np.zeros(12, bool), done)  # fmt: skip
    dims = {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "error_head": True}
    cfg = from_dict({"model": dims, "train": {"w_error": 0.1}})
    spaces = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    torch.manual_seed(0)
    wm = WorldModel.from_config(cfg, *spaces)
    for p in wm.core.error_head.parameters():  # an untrained head is constant: nothing to rank
        torch.nn.init.normal_(p)
    loopwm.save(out / "smoke.pt", wm)
    data.save(out / "smoke.npz")
    return out / "smoke.pt", out / "smoke.npz"


def percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def markdown(payload: dict[str, Any]) -> str:
    parts = [
        "# Exit rules on trained models",
        __doc__.split("\n\n")[1],
        f"Data: `{payload['data']}`, {payload['sequences']} held-out sequences per model.",
    ]
    for name, model in payload["models"].items():
        s = model["summary"]
        head = ("auroc_head",) if any(r.get("auroc_head") is not None for r in model["rows"]) else ()
        rows = [
            [
                r.get("start", "cold"),
                r["rule"],
                f"{r['setting']:g}",
                f"{r['mean_loops']:.2f}",
                f"{r['errors']['1']:.5g}",
                f"{r['errors']['10']:.5g}",
                *(
                    "-" if r.get(k) is None else f"{r[k]:.2f}"
                    for k in ("spearman_loops_error", "auroc_agreement", "auroc_bound", *head)
                ),
            ]
            for r in model["rows"]
        ]
        chosen = s["best_adaptive"]
        cheapest = "none" if s["cheapest_fixed"] is None else f"{s['cheapest_fixed']:g}, {s['cheapest_fixed_start']}"
        verdict = (
            "no adaptive setting is within 1% of the best fixed errors at 1 and 10 steps"
            if chosen is None
            else f"{chosen['rule']} at tol {chosen['setting']:g} ({chosen['start']} start) is the cheapest adaptive "
            f"setting within 1%: {chosen['mean_loops']:.2f} loops, a saving of {percent(s['saving_vs_cheapest'])} "
            f"against the cheapest fixed count within 1% ({cheapest}) and of {percent(s['saving_vs_lowest'])} against "
            f"the lowest-error one ({s['lowest_fixed']:g}, {s['lowest_fixed_start']}); "
            "target ≥ 40% against the former: "
            f"{'met' if s['saving_target_met'] else 'not met'}"
        )
        parts += [
            f"## {name}",
            f"`{model['path']}`, κ = {model['kappa']:.3f}, held out: {model['split']['held_out_transitions']} "
            f"transitions (split seed {model['split']['seed']}). {verdict}.",
            md_table(
                [
                    "start",
                    "rule",
                    "setting",
                    "mean loops",
                    "1 step",
                    "10 steps",
                    "Spearman",
                    "AUROC agreement",
                    "AUROC bound",
                ]
                + ["AUROC head"] * len(head),
                rows,
            ),
        ]
    parts += [f"Command: `{payload['machine']['command']}`", "## Machine", machine_md(payload["machine"])]
    return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH: a run folder or checkpoint")
    parser.add_argument("--data", type=Path, help="dataset (.npz) whose held-out episodes are scored")
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    parser.add_argument("--agreement", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2, 2e-2, 3e-2])
    parser.add_argument("--certified", type=float, nargs="*", default=[1e-2, 0.1, 0.3, 1.0])
    parser.add_argument("--relative", type=float, nargs="*", default=[0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--starts", nargs="+", choices=("cold", "warm"), default=["cold"])
    parser.add_argument("--max-loops", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and dataset (numbers mean nothing)")
    parser.add_argument("--name", default="exit_rules", help="stem of the JSON and markdown")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        model, args.data = smoke_model(args.out)
        args.model, args.sequences = [f"smoke={model}"], 32
    if not args.model or args.data is None:
        raise SystemExit("give --data and at least one --model NAME=PATH (or --smoke)")
    paths = {}
    for text in args.model:
        name, _, path = text.partition("=")
        if not name or not path or not Path(path).exists() or name in paths:
            raise SystemExit(f"--model {text!r}: expected a new NAME=PATH to an existing run folder or checkpoint")
        paths[name] = Path(path)
    settings(args)  # bad tolerances fail here, before any model is loaded
    data = ReplayBuffer.load(args.data)
    info = machine_info()
    models = {}
    for name, path in paths.items():
        run = load_run(path)
        # a model trained on this dataset is scored on its own held-out split (`loopwm train` splits by its seed)
        fraction, seed = (0.1, 0) if run.config is None else (run.config.train.val_fraction, run.config.seed)
        train, val = data.split(fraction, seed=seed)
        wm = run.model.eval()
        rows = score(wm, val, train, args)
        models[name] = {
            "path": str(path),
            "kappa": wm.certified_lipschitz(),
            "split": {"val_fraction": fraction, "seed": seed, "held_out_transitions": len(val)},
            "rows": rows,
            "summary": summary(rows),
        }
        print(f"{name}: {models[name]['summary']}")
    info.update(load_average_end=load_average(), command=command())
    payload = {
        "machine": info,
        "smoke": args.smoke,
        "data": str(args.data),
        "sequences": args.sequences,
        "models": models,
    }
    write_outputs(args.out, args.name, payload, markdown(payload))
    return payload


if __name__ == "__main__":
    main()
