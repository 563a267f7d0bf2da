"""World-model benchmark: held-out open-loop prediction error after a fixed CPU training budget.

For one environment (Pendulum-v1 or HalfCheetah-v5):

1. Dataset: half random transitions (`loopwm.app.collect.collect`, data.policy=random); then a quick model is
   fitted on them for `--quick-min` minutes and the other half is collected with data.policy=noisy_planner
   (MPPI on that quick model plus Gaussian noise data.noise). Both are merged into one dataset.
2. Training: the config in configs/<env>.yaml, a fixed wall-clock budget of `--budget-min` minutes counted
   over `Trainer.update` calls only; the update count reached is recorded. The checkpoint is written with
   `loopwm.train.save_run` to <out>/<env>/checkpoints/latest.pt (config inside, resumable).
3. Evaluation on the held-out episodes (train.val_fraction) with `loopwm.analysis.prediction.prediction_errors`,
   normalised with the train split's statistics (as `loopwm.app.train.train` does): 1/10/50-step errors next to
   the predict-mean and no-change baselines, then the certified exit at several tolerances with the Spearman
   correlation of loops used and step-1 error.

    python benchmarks/world_model.py --env pendulum --budget-min 10
    python benchmarks/world_model.py --env halfcheetah --budget-min 10
    python benchmarks/world_model.py --env pendulum --budget-min 0.5 --quick-min 0.25 --steps 2000 \
        --out benchmarks/out/smoke --docs benchmarks/out/smoke          # smoke run

Writes <docs>/world_model.json (one entry per environment) and <docs>/world_model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from world_model_report import markdown

from loopwm.app.run import peak_rss_mib
from loopwm.config import Config, dump_yaml, load_config
from loopwm.exits import LoopOptions

from common import REPO, command, log, machine_info

ENVS = {"pendulum": "configs/pendulum.yaml", "halfcheetah": "configs/halfcheetah.yaml"}
# The offline fit uses a wider HalfCheetah model than the online config, which is sized for planning speed.
WIDER = {
    "halfcheetah": ["model.latent_dim=128", "model.hidden_dim=256", "model.inject_dim=256", "train.batch_size=256"]
}
TARGET_STEP1_FACTOR = 5.0


def update_json(path: Path, key: str, value: Any, **top: Any) -> dict[str, Any]:
    """Merge `value` under results[key] of the JSON file at `path` (created if absent); returns the whole file."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(top)
    data.setdefault("results", {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return data


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def episode_steps(cfg: Config) -> int:
    import gymnasium as gym

    if cfg.env.max_episode_steps is not None:
        return cfg.env.max_episode_steps
    steps = gym.spec(cfg.env.id).max_episode_steps
    if steps is None:
        raise SystemExit(f"{cfg.env.id} has no time limit; set env.max_episode_steps")
    return int(steps)


def collect_part(
    config: Path,
    base: list[str],
    policy: str,
    transitions: int,
    path: Path,
    seed: int,
    planner_ckpt: Path | None,
    extra: list[str],
) -> tuple[Any, dict[str, Any]]:
    """`collect` sized so that every env finishes whole episodes (none is cut off and dropped).

    `collect` stops once stored + still-open transitions reach data.steps and stores the open ones as truncated
    episodes; asking for num_envs x whole episodes means every env stops exactly at an episode end. The part's
    config is `config` with the benchmark's `base` overrides, then this part's policy, size, seed and `extra`.
    """
    from loopwm.app.collect import collect

    cfg = load_config(config, base)
    n, t = cfg.env.num_envs, episode_steps(cfg)
    per_env = max(1, math.ceil(transitions / (n * t)))
    overrides = [f"data.policy={policy}", f"data.steps={n * per_env * t}", f"data.path={path}", f"seed={seed}", *extra]
    if planner_ckpt is not None:
        overrides.append(f"data.planner_checkpoint={planner_ckpt}")
    part_cfg = load_config(config, [*base, *overrides])
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    buffer = collect(part_cfg, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    lengths = [len(ep["rewards"]) for ep in buffer.episodes()]
    info = {
        "policy": policy,
        "transitions": len(buffer),
        "episodes": buffer.num_episodes,
        "num_envs": n,
        "episode_length_min": min(lengths),
        "episode_length_max": max(lengths),
        "episodes_per_env": per_env,
        "seconds": round(seconds, 1),
        "seed": seed,
        "path": rel(path),
        "overrides": overrides,
    }
    if policy != "random":
        info["noise"] = part_cfg.data.noise
        info["planner"] = dict(vars(part_cfg.planner))
    log(f"collected {policy}: {len(buffer)} transitions, {buffer.num_episodes} episodes in {seconds:.0f}s")
    return buffer, info


def train_for(cfg: Config, train_data: Any, minutes: float, label: str) -> tuple[Any, Any, dict[str, Any]]:
    """A fresh model trained for `minutes` of wall clock spent inside Trainer.update (stop by time)."""
    from loopwm.app.session import seed_everything
    from loopwm.envs import env_spaces
    from loopwm.train import Trainer, resolve_device
    from loopwm.world_model import WorldModel

    seed_everything(cfg.seed, cfg.threads)
    wm = WorldModel.from_config(cfg, *env_spaces(cfg.env, cfg.seed)).to(resolve_device(cfg.device))
    stats = train_data.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    trainer = Trainer(wm, cfg, train_data)
    budget = minutes * 60.0
    train_s = cpu_s = 0.0
    window: dict[str, list[float]] = {}
    next_report = 60.0
    while train_s < budget:
        w0, c0 = time.perf_counter(), time.process_time()
        out = trainer.update()
        train_s += time.perf_counter() - w0
        cpu_s += time.process_time() - c0
        for k in ("loss/total", "loss/obs", "loops/mean", "certificate/kappa"):
            window.setdefault(k, []).append(out[k])
        if train_s >= next_report or train_s >= budget:
            means = {k: float(np.mean(v)) for k, v in window.items()}
            log(
                f"{label}: {trainer.updates} updates, {train_s:.0f}s  loss={means['loss/total']:.4f} "
                f"obs={means['loss/obs']:.4f} loops={means['loops/mean']:.2f} kappa={means['certificate/kappa']:.3f}"
            )
            window, next_report = {}, next_report + 60.0
    t = cfg.train
    info = {
        "budget_s": budget,
        "updates": trainer.updates,
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(cpu_s, 2),
        "batch_size": t.batch_size,
        "horizon": t.horizon,
        "transitions_per_s": t.batch_size * t.horizon * trainer.updates / train_s,
        "updates_per_s": trainer.updates / train_s,
        "final_loss": out["loss/total"],
        "final_kappa": out["certificate/kappa"],
    }
    return wm, trainer, info


def loop_spread(wm: Any, data: Any, seed: int, horizon: int, options: LoopOptions) -> dict[str, float]:
    """Loops used at step 1 on the same 256 sequences prediction_errors samples (same seed and length)."""
    batch = data.sample(256, horizon, np.random.default_rng(seed))
    with torch.no_grad():
        device = wm.device
        out = wm.imagine(
            wm.encode(batch["obs"][0].to(device).float()),
            batch["actions"][:1].to(device).float(),
            decode="none",
            options=options,
        )
    used = out.loops[0].float().cpu().numpy()
    return {
        "min": float(used.min()),
        "max": float(used.max()),
        "mean": float(used.mean()),
        "std": float(used.std()),
        "distinct": int(len(np.unique(used))),
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        f"{'horizon':>7} | {'model':>8} | {'predict-mean':>12} | {'no-change':>9} | {'best/model':>10} | {'loops':>5}"
    ]
    rows.append("-" * len(rows[0]))
    for h, r in result["horizons"].items():
        best = min(r["predict_mean"], r["no_change"])
        rows.append(
            f"{h:>7} | {r['model']:8.4f} | {r['predict_mean']:12.4f} | {r['no_change']:9.4f} | "
            f"{best / r['model']:9.2f}x | {r['loops_mean']:5.2f}"
        )
    return "\n".join(rows)


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    hs = result["horizons"]
    out: dict[str, Any] = {}
    if "1" in hs:
        r = hs["1"]
        factor = min(r["predict_mean"], r["no_change"]) / r["model"]
        out["step1_factor_below_best_baseline"] = factor
        out["step1_target_met"] = bool(factor >= TARGET_STEP1_FACTOR)
    if "50" in hs:
        r = hs["50"]
        out["step50_below_both"] = bool(r["model"] < r["predict_mean"] and r["model"] < r["no_change"])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loopwm.analysis.prediction import prediction_errors
    from loopwm.app.train import load_dataset
    from loopwm.envs import env_spaces, replay_buffer
    from loopwm.train import save_run

    config = REPO / ENVS[args.env]
    out_dir = Path(args.out) / args.env
    data_path = out_dir / "dataset.npz"
    base = [
        f"name={args.env}",
        f"run_dir={rel(Path(args.out))}",
        f"data.path={rel(data_path)}",
        f"env.num_envs={args.num_envs}",
        f"seed={args.seed}",
        f"threads={args.threads}",
        *WIDER.get(args.env, []),
    ]
    cfg = load_config(config, base)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    machine = machine_info()
    log(
        f"{args.env}: {machine['nproc']} CPUs ({machine['cpu_model']}), torch {machine['torch']}, "
        f"load {machine['load_average_start']}"
    )
    record: dict[str, Any] = {
        "env": cfg.env.id,
        "config": ENVS[args.env],
        "command": command(),
        "machine_at_start": machine,
        "overrides": base,
    }
    wall0 = time.perf_counter()

    # ---- 1. dataset: random half, quick model, noisy-planner half --------------------------------------
    half = args.steps // 2
    random_buf, random_info = collect_part(config, base, "random", half, out_dir / "random.npz", args.seed, None, [])
    quick_cfg = load_config(config, [*base, f"name={args.env}-quick"])
    quick_train, _ = random_buf.split(quick_cfg.train.val_fraction, seed=quick_cfg.seed)
    _, quick_trainer, quick_info = train_for(quick_cfg, quick_train, args.quick_min, "quick model")
    quick_trainer.cfg.train.updates = quick_trainer.updates
    quick_ckpt = out_dir / "quick" / "latest.pt"
    save_run(quick_ckpt, quick_trainer)
    quick_info["checkpoint"] = rel(quick_ckpt)
    planner_extra = [
        f"planner.samples={args.plan_samples}",
        f"planner.elites={args.plan_elites}",
        f"planner.iterations={args.plan_iterations}",
        f"data.noise={args.noise}",
    ]
    planner_buf, planner_info = collect_part(
        config,
        base,
        "noisy_planner",
        args.steps - half,
        out_dir / "planner.npz",
        args.seed + 1000,
        quick_ckpt,
        planner_extra,
    )
    obs_space, act_space = env_spaces(cfg.env, cfg.seed)
    merged = replay_buffer(cfg, obs_space, act_space)
    for part in (random_buf, planner_buf):
        for ep in part.episodes():
            merged.add_episode(ep["obs"], ep["actions"], ep["rewards"], ep["terminated"], ep["truncated"])
    merged.save(data_path)
    train_data, val_data = load_dataset(cfg)  # exactly the split `loopwm train` uses
    record["dataset"] = {
        "path": rel(data_path),
        "transitions": len(merged),
        "episodes": merged.num_episodes,
        "parts": [random_info, planner_info],
        "quick_model": quick_info,
        "val_fraction": cfg.train.val_fraction,
        "train": {"transitions": len(train_data), "episodes": train_data.num_episodes},
        "val": {"transitions": len(val_data), "episodes": val_data.num_episodes},
    }
    log(
        f"dataset {len(merged)} transitions ({merged.num_episodes} episodes): train {len(train_data)}, "
        f"held-out {len(val_data)} ({val_data.num_episodes} episodes)"
    )

    # ---- 2. fixed-budget training --------------------------------------------------------------------
    load0 = list(os.getloadavg())
    wm, trainer, train_info = train_for(cfg, train_data, args.budget_min, "train")
    train_info["loadavg_before"], train_info["loadavg_after"] = load0, list(os.getloadavg())
    trainer.cfg.train.updates = trainer.updates  # the saved config says how far it went, so a resume is a no-op
    ckpt = out_dir / "checkpoints" / "latest.pt"
    save_run(ckpt, trainer, benchmark={"train_seconds": train_info["train_seconds"], "budget_min": args.budget_min})
    dump_yaml(trainer.cfg, out_dir / "config.yaml")
    train_info["checkpoint"] = rel(ckpt)
    record["training"] = train_info
    log(
        f"trained {trainer.updates} updates in {train_info['train_seconds']:.0f}s "
        f"({train_info['transitions_per_s']:.0f} transitions/s); checkpoint {rel(ckpt)}"
    )

    # ---- 3. held-out evaluation ------------------------------------------------------------------------
    stats = train_data.stats()
    norm = {"obs_mean": stats["obs_mean"], "obs_var": stats["obs_std"].pow(2)}
    horizons = (1, 10, 50)
    fixed = prediction_errors(wm, val_data, horizons, seed=cfg.seed, **norm)
    fixed["exit"] = f"{cfg.model.exit} (loops={cfg.model.loops})"
    fixed["verdict"] = verdict(fixed)
    record["eval_default_exit"] = fixed
    print(f"\n{cfg.env.id}: held-out errors, exit={fixed['exit']}\n{table(fixed)}")
    longest = max(int(h) for h in fixed["horizons"])
    certified = []
    for tol in args.tols:
        options = LoopOptions.from_config(cfg.model, exit="certified", tol=tol)
        res = prediction_errors(wm, val_data, horizons, seed=cfg.seed, options=options, **norm)
        res["tol"] = tol
        res["step1_loops"] = loop_spread(wm, val_data, cfg.seed, longest, options)
        res["verdict"] = verdict(res)
        certified.append(res)
        print(
            f"\ncertified exit tol={tol:g} (min_loops={cfg.model.min_loops}, max_loops={cfg.model.max_loops}): "
            f"spearman(loops, step-1 error)={res['loops_error_spearman_step1']:.3f}, "
            f"step-1 loops {res['step1_loops']}\n{table(res)}"
        )
    record["eval_certified_exit"] = certified
    record["peak_rss_mb"] = peak_rss_mib()  # MiB; the key predates the unit's name
    record["total_wall_s"] = round(time.perf_counter() - wall0, 1)
    record["machine_at_end"] = {"loadavg": list(os.getloadavg())}
    print(
        f"\nthroughput {train_info['transitions_per_s']:.0f} transitions/s "
        f"({trainer.updates} updates x {cfg.train.batch_size} x {cfg.train.horizon} / "
        f"{train_info['train_seconds']:.0f}s), peak RSS {record['peak_rss_mb']:.0f} MB"
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=sorted(ENVS), required=True)
    parser.add_argument("--budget-min", type=float, default=10.0, help="training budget, minutes of update wall clock")
    parser.add_argument("--quick-min", type=float, default=2.0, help="training minutes of the planner's quick model")
    parser.add_argument("--steps", type=int, default=50_000, help="dataset transitions (half random, half planner)")
    parser.add_argument(
        "--num-envs",
        type=int,
        default=25,
        help="vector envs for collection (25 gives whole episodes summing to exactly 25k for both envs)",
    )
    parser.add_argument("--plan-samples", type=int, default=32)
    parser.add_argument("--plan-elites", type=int, default=4)
    parser.add_argument("--plan-iterations", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.3, help="data.noise: Gaussian std added to planner actions")
    parser.add_argument("--tols", type=float, nargs="+", default=[0.3, 0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (configs say 2; on a shared 2-core machine 2 OpenMP threads were ~100x slower)",
    )
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--docs", default="docs/benchmarks")
    args = parser.parse_args()
    os.chdir(REPO)
    record = run(args)
    data = update_json(Path(args.docs) / "world_model.json", args.env, record, machine=machine_info())
    (Path(args.docs) / "world_model.md").write_text(markdown(data))
    log(f"wrote {Path(args.docs) / 'world_model.json'} and world_model.md")


if __name__ == "__main__":
    main()
