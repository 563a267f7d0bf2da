"""Shared helpers for the benchmark scripts: timing, matmul peak, machine description, output files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine inflates every timing."""
    return [round(x, 2) for x in os.getloadavg()]


THREADING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def threading_env() -> dict[str, str]:
    """Environment variables that change how the thread pools wait and scale (only those set)."""
    return {k: os.environ[k] for k in THREADING_ENV if k in os.environ}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = float("nan")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gb": mem_gb,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threading_env": threading_env(),
        "load_average_start": load_average(),
    }


def log(msg: str) -> None:
    """A timestamped progress line, flushed so that a log file shows where a long run is."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command() -> str:
    """The exact command line that produced the outputs (threading variables included), from the repo root."""
    script = os.path.relpath(sys.argv[0], REPO)
    env = [f"{k}={v}" for k, v in threading_env().items()]
    return shlex.join([*env, ".venv/bin/python", script, *sys.argv[1:]])


def parse_define(text: str) -> tuple[str, list[str]]:
    """A `--define NAME='key=value ...'` argument as its variant name and config overrides."""
    name, _, overrides = text.partition("=")
    if not name or not overrides.strip():
        raise SystemExit(f"--define {text!r}: expected NAME='key=value key=value'")
    return name, shlex.split(overrides)


@dataclass
class Samples:
    """Timings of one function: wall-clock seconds and process CPU seconds (all threads) per call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, fn: Callable[[], Any]) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - start_cpu)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, Samples]:
    """`repeats` timings of each function, taken in rounds (one call of each per round, order rotated).

    Interleaving exposes every variant to the same background load, so ratios between them are
    fairer than ratios between back-to-back blocks of timings.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: Samples() for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].add(fns[name])
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[r] / den[r]: robust to load that drifts between rounds."""
    return median([a / b for a, b in zip(num, den)])


def matmul_peak(threads: int, repeats: int, sizes: Sequence[int] = (256, 512, 1024)) -> dict[str, float]:
    """Median GFLOP/s of float32 torch.mm on n×n matrices, for each n, at `threads` threads."""
    torch.set_num_threads(threads)
    out = {}
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        t = interleaved({"mm": lambda a=a, b=b, c=c: torch.mm(a, b, out=c)}, repeats, warmup=3)["mm"].wall
        out[str(n)] = 2 * n**3 / median(t) / 1e9
    return out


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats from 100 up print as integers, smaller ones with three significant digits."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_md(info: dict[str, Any]) -> str:
    """The machine section of a markdown report."""
    busy = info["load_average_start"][0] > 0.5
    load_note = (
        "other processes shared the cores, so timings are noisy"
        if busy
        else "the machine was idle when the run started"
    )
    return "\n".join(
        [
            f"- CPU: {info['cpu_model']}, `nproc` = {info['nproc']}",
            f"- torch {info['torch']}, Python {info['python']}; "
            f"threading variables: {info['threading_env'] or 'none set'}",
            f"- load average (1/5/15 min) at start {info['load_average_start']}, "
            f"at end {info['load_average_end']}: {load_note}",
            f"- command: `{info['command']}`",
        ]
    )


def write_outputs(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> None:
    """Write `<name>.json` and `<name>.md` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(f"wrote {out_dir / name}.json and .md")
