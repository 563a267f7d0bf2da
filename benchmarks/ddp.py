"""Data-parallel training: updates per second with 1 and 2 processes, and their loss curves side by side.

Each variant is a real `loopwm train` on the same Pendulum dataset with the same global batch
(`configs/pendulum.yaml`: 128 sequences of 5 steps): one process on one thread; one process on two
threads (what the second core buys without torch.distributed); and `torchrun --nproc_per_node=2` with one
thread per process, each process sampling 64 sequences from its own stream, gradients averaged by one
all-reduce per update (gloo). Updates per second are measured inside `Trainer.update` (sampling, forward,
backward, all-reduce, optimiser step: the `perf/transitions_per_s` metric divided by batch × horizon),
and also over the whole launch (start-up, dataset loading and the held-out evaluation included).

    .venv/bin/python benchmarks/ddp.py --updates 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loopwm.app.collect import collect
from loopwm.config import load_config

from common import DEFAULT_OUT, REPO, command, load_average, machine_info, machine_md, md_table, write_outputs

CONFIG = REPO / "configs" / "pendulum.yaml"
WORK = REPO / "benchmarks" / "out" / "ddp"
VARIANTS = {  # name: (processes, threads per process)
    "1 process, 1 thread": (1, 1),
    "1 process, 2 threads": (1, 2),
    "2 processes (torchrun, gloo), 1 thread each": (2, 1),
}


def launch(name: str, processes: int, threads: int, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """One `loopwm train` run (under torchrun when processes > 1); returns its timings and logged losses."""
    run_name = f"p{processes}t{threads}"
    overrides = [
        f"name={run_name}",
        f"run_dir={WORK / 'runs'}",
        f"data.path={data}",
        "device=cpu",
        f"threads={threads}",
        f"train.updates={args.updates}",
        f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.updates}",
    ]
    cli = ["-m", "loopwm", "train", "-q", str(CONFIG), *overrides]
    if processes > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *cli], cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (WORK / "runs" / run_name / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(CONFIG)
    per_update = cfg.train.batch_size * cfg.train.horizon
    rates = [r["perf/transitions_per_s"] / per_update for r in rows]
    return {
        "processes": processes,
        "threads": threads,
        "wall_s": wall,
        "updates": args.updates,
        "updates_per_s_in_update": sorted(rates)[len(rates) // 2],  # median over logging windows
        "updates_per_s_wall": args.updates / wall,
        "loss": [[r["step"], r["loss/total"]] for r in rows],
    }


def markdown(payload: dict[str, Any]) -> str:
    runs = payload["runs"]
    base = runs["1 process, 1 thread"]["updates_per_s_in_update"]
    speed = md_table(
        ["variant", "updates/s (inside update)", "× 1 process", "updates/s (whole launch)", "wall s"],
        [
            [
                name,
                r["updates_per_s_in_update"],
                r["updates_per_s_in_update"] / base,
                r["updates_per_s_wall"],
                r["wall_s"],
            ]
            for name, r in runs.items()
        ],
    )
    names = list(runs)
    steps = [s for s, _ in runs[names[0]]["loss"]]
    curves = {name: dict(map(tuple, r["loss"])) for name, r in runs.items()}
    loss = md_table(
        ["update", *[f"loss/total: {n}" for n in names]],
        [[s, *[curves[n].get(s, float("nan")) for n in names]] for s in steps],
    )
    return "\n\n".join(
        [
            "# Data-parallel training on 2 cores",
            __doc__.split("\n\n")[1].replace("\n", " "),
            f"Dataset: {payload['dataset_steps']} random Pendulum-v1 transitions (`loopwm collect`); "
            f"{payload['updates']} updates per variant, losses logged every {payload['log_every']} updates "
            "(the mean over those updates; the 2-process value is averaged over both processes).",
            "## Speed",
            speed,
            "## Loss curves (same global batch and seed; the 2-process run samples from two streams)",
            loss,
            "## Machine",
            machine_md(payload["machine"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--dataset-steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    info = machine_info()
    data = WORK / "pendulum.npz"
    shutil.rmtree(WORK / "runs", ignore_errors=True)  # each variant starts a fresh run folder
    cfg = load_config(CONFIG, [f"data.path={data}", f"data.steps={args.dataset_steps}", "device=cpu"])
    collect(cfg, progress=False, overwrite=True)
    runs = {name: launch(name, p, t, args, data) for name, (p, t) in VARIANTS.items()}
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {
        "machine": info,
        "config": "configs/pendulum.yaml",
        "updates": args.updates,
        "log_every": args.log_every,
        "dataset_steps": args.dataset_steps,
        "runs": runs,
    }
    write_outputs(args.out, "ddp", payload, markdown(payload))


if __name__ == "__main__":
    main()
