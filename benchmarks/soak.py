"""Soak: does a long `loopwm run` on Pendulum-v1 hold its memory and file handles flat?

`loopwm run configs/pendulum.yaml` runs as a subprocess with a small replay (`data.capacity`, default
1,000 transitions, so it fills within minutes) and an endless step budget. Every `--interval` seconds the
script samples the process's resident memory (VmRSS) and its open file descriptors from /proc, and the
environment step from the run's metrics.jsonl. After `--minutes` it sends SIGTERM, which the run answers
by saving a checkpoint and exiting; the script then checks that the checkpoint loads. Growth is the
least-squares slope of RSS over the samples taken once the replay is full.

    .venv/bin/python benchmarks/soak.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopwm.checkpoint import load_run

from common import DEFAULT_OUT, REPO, command, load_average, machine_info, machine_md, md_table, write_outputs


def proc_sample(pid: int) -> tuple[float, int]:
    """(resident memory in MiB, open file descriptors) of a live process, read from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def last_step(metrics: Path) -> int:
    """The largest step the run has logged so far (0 before its first line)."""
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines(keepends=True) if line.endswith("\n")]
    return max(steps, default=0)


def soak(minutes: float, interval: float, capacity: int, run_dir: Path, extra: list[str]) -> dict[str, Any]:
    """Run `loopwm run` for `minutes`, sampling it every `interval` seconds, then stop it with SIGTERM."""
    overrides = [
        "name=soak",
        f"run_dir={run_dir}",
        f"data.capacity={capacity}",
        "agent.total_steps=100000000",
        *extra,
    ]
    cmd = [sys.executable, "-m", "loopwm", "run", "configs/pendulum.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    log = open(run_dir / "soak.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "soak" / "metrics.jsonl"
    samples = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < 60 * minutes:
            time.sleep(interval)
            if proc.poll() is not None:
                tail = (run_dir / "soak.log").read_text()[-2000:]
                raise RuntimeError(f"loopwm run exited early with {proc.returncode}:\n{tail}")
            rss, fds = proc_sample(proc.pid)
            samples.append(
                {"t_s": round(time.monotonic() - start, 1), "step": last_step(metrics), "rss_mib": rss, "fds": fds}
            )
            print(json.dumps(samples[-1]), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=300)
        log.close()
    loaded = load_run(run_dir / "soak")
    return {
        "command": cmd[1:],
        "overrides": overrides,
        "returncode": returncode,
        "checkpoint_kind": loaded.kind,
        "checkpoint_step": int(loaded.payload["progress"]["step"]),
        "samples": samples,
    }


def summarise(samples: list[dict[str, Any]], capacity: int) -> dict[str, Any]:
    """RSS growth (slope, first/last/max) and the file-handle range, over the samples with a full replay."""
    full = [s for s in samples if s["step"] >= capacity]
    if len(full) < 2:
        raise RuntimeError(f"only {len(full)} samples came after the replay filled ({capacity} steps): soak longer")
    t = np.array([s["t_s"] for s in full]) / 3600
    rss = np.array([s["rss_mib"] for s in full])
    slope = float(np.polyfit(t, rss, 1)[0])
    return {
        "samples_full": len(full),
        "full_from_s": full[0]["t_s"],
        "steps": [full[0]["step"], full[-1]["step"]],
        "rss_first_mib": float(rss[0]),
        "rss_last_mib": float(rss[-1]),
        "rss_max_mib": float(rss.max()),
        "rss_slope_mib_per_h": slope,
        "fds_min": min(s["fds"] for s in full),
        "fds_max": max(s["fds"] for s in full),
        "fds_all": sorted({s["fds"] for s in samples}),
    }


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    table = md_table(
        ["t (s)", "env step", "RSS (MiB)", "open fds"],
        [[x["t_s"], x["step"], x["rss_mib"], x["fds"]] for x in payload["samples"]],
    )
    verdict = "\n".join(
        [
            f"- run: `{' '.join(['loopwm', *payload['command'][2:]])}`",
            f"- replay full (step ≥ {payload['capacity']}) from t = {s['full_from_s']:.0f} s; "
            f"{s['samples_full']} samples after that, env steps {s['steps'][0]} to {s['steps'][1]}",
            f"- RSS once full: {s['rss_first_mib']:.1f} MiB first, {s['rss_last_mib']:.1f} MiB last, "
            f"{s['rss_max_mib']:.1f} MiB max; least-squares slope {s['rss_slope_mib_per_h']:+.2f} MiB/h",
            f"- open file descriptors once full: {s['fds_min']} to {s['fds_max']} (all samples: {s['fds_all']})",
            f"- SIGTERM after {payload['minutes']} min: exit code {payload['returncode']}, "
            f"the {payload['checkpoint_kind']} checkpoint at env step {payload['checkpoint_step']} "
            "loads with `load_run`",
        ]
    )
    return "\n\n".join(
        [
            "# Soak of `loopwm run` on Pendulum-v1",
            __doc__.split("\n\n")[1].replace("\n", " "),
            verdict,
            "## Samples",
            table,
            "## Machine",
            machine_md(payload["machine"]),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--capacity", type=int, default=1000, help="data.capacity: at least one 200-step episode")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for the run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="loopwm-soak-") as tmp:
        result = soak(args.minutes, args.interval, args.capacity, Path(tmp), args.override)
    info["load_average_end"] = load_average()
    info["command"] = command()
    payload = {
        "machine": info,
        "minutes": args.minutes,
        "interval_s": args.interval,
        "capacity": args.capacity,
        **result,
        "summary": summarise(result["samples"], args.capacity),
    }
    write_outputs(args.out, "soak", payload, markdown(payload))
    return payload


if __name__ == "__main__":
    main()
