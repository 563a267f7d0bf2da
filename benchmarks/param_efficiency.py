"""Parameter efficiency: loopwm next to an unshared stack, plain MLP dynamics and an observation-space MLP.

For each task a random-policy dataset is collected once (`loopwm.app.collect.collect`, seeded) and split by whole
episodes (`ReplayBuffer.split`, seed 0). Every variant is trained on the same train split with the same number of
updates and scored on the same 256 held-out sequences with the semantics of
`loopwm.analysis.prediction.prediction_errors`:
open-loop rollouts from the first observation with the logged actions, squared error divided per dimension by the
train split's variance, averaged over dimensions, at 1/10/50 steps.

Variants (`param_variants.VARIANTS`; `--define NAME='key=value ...'` adds a loopwm variant with config overrides):
- loopwm variants: `configs/<task>.yaml` plus overrides, trained with `loopwm.train.Trainer`, scored with
  `prediction_errors`; diagnostics at every evaluation point: the reconstruction floor (decoding the encoder's
  latent of the true observation) and the latent error against the encoder's target at 1/10/50 steps;
- "stack": `model.shared=false`, `model.loops` distinct blocks of the same width applied once each, with the
  encoder, heads, loss, data and updates of `loopwm-plain` (about `model.loops`x the block's parameters);
- "mlp-params" / "mlp-flops": `model.dynamics=mlp`, a TD-MPC2-style core (Linear-LayerNorm-Mish x2, no loop)
  between the same prelude and coda, its width chosen (`loopwm.flops.matched_width`) so that the whole model
  has the parameters, or the multiply-adds per step, of the task's shipped loopwm config under the protocol;
- "obs-mlp" (`obs_mlp.py`): 4x200 SiLU in observation space predicting the normalised observation delta from a
  1-step loss (PETS/MBPO style), rolled out open loop from the same first observations.

Each run records parameters, analytic multiply-adds per environment step (`loopwm.flops.step_macs`), the errors at
every `--eval-at` point and the training wall time (updates only). Runs are merged into
`<docs>/param_efficiency.json` under a protocol name (one job per invocation on a shared machine), and the markdown
is rebuilt from the whole JSON; a figure of the errors against parameters and against FLOPs per step is drawn
for the task (`param_efficiency_<protocol>_<task>.png` next to the JSON; with --smoke, into --out).

    python benchmarks/param_efficiency.py --task pendulum --variants loopwm obs-mlp --seeds 0 --eval-at 250 500 1000
    python benchmarks/param_efficiency.py --task hopper --variants loopwm loopwm-plain stack mlp-params mlp-flops \
        obs-mlp --seeds 0 1 2 --protocol variants
    python benchmarks/param_efficiency.py --smoke --out /tmp/pe --docs /tmp/pe      # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from obs_mlp import ObsMLP, fit_obs_mlp
from param_measures import count_parameters, horizon_means, idle_parameters, loopwm_diagnostics, normalised_errors
from param_report import markdown, plot_task
from param_variants import VARIANTS, Variant

from loopwm.config import Config, load_config
from loopwm.replay import ReplayBuffer

from common import REPO, command, log, machine_info, parse_define

TASKS = {
    "pendulum": ("configs/pendulum.yaml", 2000),
    "halfcheetah": ("configs/halfcheetah.yaml", 1000),
    "hopper": ("configs/hopper.yaml", 1000),
}
"""Each task's config and its default number of updates (the reference MLP measurements used these)."""
HORIZONS = (1, 10, 50)
SEQUENCES = 256
SPLIT_SEED = EVAL_SEED = DATA_SEED = 0


@dataclass
class Protocol:
    """What every variant of one task shares: data size, updates, the MLP's batch and the evaluation points."""

    steps: int
    updates: int
    mlp_batch: int = 256
    eval_at: list[int] = field(default_factory=list)
    smoke: bool = False


def task_config(task: str, seed: int, overrides: list[str], protocol: Protocol, data_path: Path) -> Config:
    """The task's YAML with the protocol's and the variant's overrides: one thread, CPU, fixed updates."""
    base = [
        f"seed={seed}",
        "threads=1",
        "device=cpu",
        f"train.updates={protocol.updates}",
        f"data.path={data_path}",
        f"data.steps={protocol.steps}",
        "data.policy=random",
        "env.num_envs=1",
    ]
    if protocol.smoke:
        base += [
            "model.latent_dim=8",
            "model.hidden_dim=16",
            "model.inject_dim=16",
            "model.mlp_dim=16",
            "train.batch_size=8",
            "train.horizon=3",
        ]
    return load_config(REPO / TASKS[task][0], [*base, *overrides])


def dataset(task: str, protocol: Protocol, out: Path) -> tuple[ReplayBuffer, ReplayBuffer, dict[str, Any]]:
    """The task's random-policy dataset (collected once and cached), split into train and held-out episodes."""
    from loopwm.app.collect import collect

    path = out / f"{task}-random-{protocol.steps}-s{DATA_SEED}.npz"
    cfg = task_config(task, DATA_SEED, [], protocol, path)
    start = time.perf_counter()
    if path.is_file():
        buffer, seconds = ReplayBuffer.load(path), None
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = collect(cfg, progress=False)
        seconds = round(time.perf_counter() - start, 1)
    train, val = buffer.split(cfg.train.val_fraction, seed=SPLIT_SEED)
    info = {
        "env": cfg.env.id,
        "policy": "random",
        "transitions": len(buffer),
        "episodes": buffer.num_episodes,
        "seed": DATA_SEED,
        "split_seed": SPLIT_SEED,
        "val_fraction": cfg.train.val_fraction,
        "train_transitions": len(train),
        "val_transitions": len(val),
        "val_episodes": val.num_episodes,
        "collect_seconds": seconds,
    }
    return train, val, info


def held_out(val: ReplayBuffer, horizon: int) -> dict[str, torch.Tensor]:
    """The held-out sequences every variant is scored on: those `prediction_errors` samples (same seed and length)."""
    return val.sample(SEQUENCES, horizon, np.random.default_rng(EVAL_SEED))


def run_loopwm(
    task: str, variant: Variant, seed: int, protocol: Protocol, train: ReplayBuffer, val: ReplayBuffer, data_path: Path
) -> dict[str, Any]:
    """Train one loopwm variant with the Trainer and score it with `prediction_errors` at every evaluation point."""
    from loopwm.analysis.prediction import prediction_errors
    from loopwm.app.session import seed_everything
    from loopwm.envs import env_spaces
    from loopwm.flops import step_macs
    from loopwm.train import Trainer
    from loopwm.world_model import WorldModel

    cfg = task_config(task, seed, variant.overrides, protocol, data_path)
    matched = matched_dynamics(task, cfg, variant, protocol, data_path) if variant.match else None
    if matched is not None:
        cfg = task_config(
            task, seed, [*variant.overrides, f"model.dynamics_width={matched['width']}"], protocol, data_path
        )
    seed_everything(cfg.seed, cfg.threads)
    wm = WorldModel.from_config(cfg, *env_spaces(cfg.env))
    stats = train.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    var = stats["obs_std"].pow(2)
    batch = held_out(val, max(HORIZONS))
    trainer = Trainer(wm, cfg, train)

    def evaluate() -> dict[str, Any]:
        res = prediction_errors(wm, val, HORIZONS, SEQUENCES, seed=EVAL_SEED, obs_mean=stats["obs_mean"], obs_var=var)
        return {
            "errors": {h: r["model"] for h, r in res["horizons"].items()},
            "baselines": {
                h: {"predict_mean": r["predict_mean"], "no_change": r["no_change"]} for h, r in res["horizons"].items()
            },
            **loopwm_diagnostics(wm, batch, var, HORIZONS),
        }

    def update() -> float:
        return float(trainer.update()["loss/total"])

    record = train_and_score(update, evaluate, protocol)
    record.update(
        parameters=count_parameters(wm),
        core_parameters=count_parameters(wm.core),
        idle_parameters=idle_parameters(wm),
        macs_per_step=step_macs(wm)["total"],
        loops=cfg.model.loops if cfg.model.dynamics == "loop" else 1,
        transitions_per_update=cfg.train.batch_size * cfg.train.horizon,
        kappa=wm.certified_lipschitz(),
    )
    if matched is not None:
        record["matched"] = matched
    return record


def matched_dynamics(task: str, cfg: Config, variant: Variant, protocol: Protocol, data_path: Path) -> dict[str, Any]:
    """The MLP core width at which `cfg` matches the task's shipped loopwm (under the protocol) in `variant.match`."""
    from loopwm.envs import env_spaces
    from loopwm.flops import matched_width, model_cost
    from loopwm.nets import SpaceSpec
    from loopwm.world_model import WorldModel

    shipped = task_config(task, cfg.seed, [], protocol, data_path)
    spaces = env_spaces(cfg.env)
    target = model_cost(WorldModel.from_config(shipped, *spaces), variant.match)
    width = matched_width(cfg.model, SpaceSpec.from_spaces(*spaces), target, variant.match)
    return {"by": variant.match, "reference": "loopwm", "reference_cost": target, "width": width}


def run_obs_mlp(
    task: str, variant: Variant, seed: int, protocol: Protocol, train: ReplayBuffer, val: ReplayBuffer, data_path: Path
) -> dict[str, Any]:
    """Train the observation-space MLP with a 1-step loss and score its open-loop rollouts on the same sequences."""
    torch.manual_seed(seed)
    stats = train.stats()
    var = stats["obs_std"].pow(2)
    width, layers = (16, 2) if protocol.smoke else (200, 4)
    model = ObsMLP.from_data(train, width, layers)
    batch = held_out(val, max(HORIZONS))
    step = fit_obs_mlp(model, train, protocol.mlp_batch, np.random.default_rng(seed))

    @torch.no_grad()
    def evaluate() -> dict[str, Any]:
        pred = model.rollout(batch["obs"][0].float(), batch["actions"].float())
        return {"errors": horizon_means(normalised_errors(pred, batch["obs"][1:].float(), var), HORIZONS)}

    record = train_and_score(step, evaluate, protocol)
    record.update(
        parameters=count_parameters(model),
        macs_per_step=float(model.macs()),
        width=width,
        layers=layers,
        transitions_per_update=protocol.mlp_batch,
    )
    return record


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"loopwm": run_loopwm, "obs-mlp": run_obs_mlp}


def train_and_score(
    update: Callable[[], float], evaluate: Callable[[], dict[str, Any]], protocol: Protocol
) -> dict[str, Any]:
    """Run `protocol.updates` updates, evaluating at each `eval_at` point and at the end; time the updates only."""
    points = sorted({p for p in protocol.eval_at if 0 < p < protocol.updates} | {protocol.updates})
    curve, seconds, cpu, losses = [], 0.0, 0.0, []
    done = 0
    for point in points:
        w0, c0 = time.perf_counter(), time.process_time()
        while done < point:
            losses.append(update())
            done += 1
        seconds += time.perf_counter() - w0
        cpu += time.process_time() - c0
        curve.append(
            {"updates": point, "train_seconds": round(seconds, 2), "loss": float(np.mean(losses[-50:])), **evaluate()}
        )
        log(f"  {point} updates, {seconds:.0f}s: errors {fmt(curve[-1]['errors'])}")
    final = curve[-1]
    return {
        "updates": protocol.updates,
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu, 2),
        "errors": final["errors"],
        "curve": curve,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def fmt(errors: dict[str, float]) -> str:
    return " · ".join(f"{h}: {e:.2e}" for h, e in errors.items())


def merge(
    path: Path,
    protocol_name: str,
    protocol: Protocol,
    task: str,
    data_info: dict[str, Any],
    variant: Variant,
    seed: int,
    record: dict[str, Any],
    figure: Optional[str] = None,
) -> dict[str, Any]:
    """Add one run to the JSON at `path`; a protocol name always stands for the same settings. `figure` names the
    task's PNG written next to the JSON, for the markdown to show."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    proto = {
        "steps": protocol.steps,
        "updates": protocol.updates,
        "mlp_batch": protocol.mlp_batch,
        "horizons": list(HORIZONS),
        "sequences": SEQUENCES,
        "eval_seed": EVAL_SEED,
    }
    entry = data.setdefault("protocols", {}).setdefault(protocol_name, {"settings": proto, "tasks": {}})
    if entry["settings"] != proto:
        raise SystemExit(
            f"protocol {protocol_name!r} was recorded with {entry['settings']}, not {proto}: "
            "pass another --protocol name"
        )
    task_entry = entry["tasks"].setdefault(task, {"dataset": data_info, "variants": {}})
    if figure is not None:
        task_entry["figure"] = figure
    var_entry = task_entry["variants"].setdefault(
        variant.name, {"kind": variant.kind, "overrides": variant.overrides, "note": variant.note, "seeds": {}}
    )
    var_entry.update(kind=variant.kind, overrides=variant.overrides, note=variant.note)
    var_entry["seeds"][str(seed)] = record
    data["machine"] = machine_info()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return data


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="pendulum")
    parser.add_argument("--variants", nargs="+", default=["loopwm", "obs-mlp"])
    parser.add_argument("--define", action="append", default=[], help="NAME='key=value ...': a loopwm variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=20_000, help="dataset transitions (random policy)")
    parser.add_argument("--updates", type=int, default=None, help="default: the task's (TASKS)")
    parser.add_argument("--eval-at", type=int, nargs="*", default=[], help="extra evaluation points (updates)")
    parser.add_argument("--protocol", default="full", help="name the settings are recorded under")
    parser.add_argument("--smoke", action="store_true", help="tiny data, models and updates: runs in seconds")
    parser.add_argument("--out", default="benchmarks/out/param_efficiency", help="datasets")
    parser.add_argument("--docs", default="docs/benchmarks", help="param_efficiency.json and .md")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    torch.set_num_threads(1)
    variants = dict(VARIANTS)
    for text in args.define:
        name, overrides = parse_define(text)
        if name in variants:
            raise SystemExit(f"--define {text!r}: variant {name!r} is already defined")
        variants[name] = Variant(name, overrides=overrides, note="defined on the command line")
    unknown = [v for v in args.variants if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}: expected one of {sorted(variants)} or --define it")
    if args.smoke:
        protocol = Protocol(steps=600, updates=6, mlp_batch=16, eval_at=[3], smoke=True)
        name = "smoke"
    else:
        protocol = Protocol(args.steps, args.updates or TASKS[args.task][1], eval_at=args.eval_at)
        name = args.protocol
    out, docs = Path(args.out), Path(args.docs)
    train, val, info = dataset(args.task, protocol, out)
    data_path = out / f"{args.task}-random-{protocol.steps}-s{DATA_SEED}.npz"
    log(
        f"{args.task}: {info['transitions']} transitions, held-out {info['val_transitions']} "
        f"({info['val_episodes']} episodes)"
    )
    figure = f"param_efficiency_{name}_{args.task}.png"
    figure_path = (out if args.smoke else docs) / figure
    for seed in args.seeds:
        for vname in args.variants:
            variant = variants[vname]
            log(f"{args.task} / {vname} / seed {seed} ({protocol.updates} updates)")
            record = RUNNERS[variant.kind](args.task, variant, seed, protocol, train, val, data_path)
            record["command"] = command()
            data = merge(
                docs / "param_efficiency.json",
                name,
                protocol,
                args.task,
                info,
                variant,
                seed,
                record,
                None if args.smoke else figure,
            )
            (docs / "param_efficiency.md").write_text(markdown(data))
    entry = data["protocols"][name]
    plot_task(entry["tasks"][args.task], entry["settings"]["horizons"], f"{args.task}, protocol {name}", figure_path)
    log(f"wrote {docs / 'param_efficiency.json'}, .md and {figure_path}")


if __name__ == "__main__":
    main()
