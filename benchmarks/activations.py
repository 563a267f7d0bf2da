"""Elementwise activation cost on this CPU: why the loop uses ReLU and the heads SiLU.

python benchmarks/activations.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "mish": F.mish,
}


def median_us(fn, x: torch.Tensor, repeats: int, inner: int = 50) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn(x)
        times.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    x = torch.randn(256, 256)
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows[threads] = {name: median_us(fn, x, args.repeats) for name, fn in ACTIVATIONS.items()}
    lines = ["| activation | 1 thread µs | 2 threads µs | × relu (1 thread) |", "| --- | ---: | ---: | ---: |"]
    for name in ACTIVATIONS:
        lines.append(f"| {name} | {rows[1][name]:.1f} | {rows[2][name]:.1f} | {rows[1][name] / rows[1]['relu']:.1f} |")
    md = (
        "# Activation cost on a 256×256 float32 tensor\n\nMedian of "
        f"{args.repeats} timings; torch {torch.__version__}; command `python benchmarks/activations.py`.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activations.json").write_text(json.dumps({"torch": torch.__version__, "us": rows}, indent=2))
    (out / "activations.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
