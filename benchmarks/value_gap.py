"""The value gap of a stable-baselines3 agent trained only inside the model: its return in the model
against its return in real Pendulum-v1, from the same starts (examples/sb3_in_model.py at its defaults).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/value_gap.py
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, REPO, command, load_average, machine_info, machine_md, md_table, write_outputs  # noqa: E402


def main() -> None:
    spec = importlib.util.spec_from_file_location("sb3_in_model", REPO / "examples" / "sb3_in_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    info = machine_info()
    start = time.perf_counter()
    result = example.main(sys.argv[1:])
    seconds = time.perf_counter() - start
    info.update(load_average_end=load_average(), command=command())
    args = result["args"]
    pairs = zip(result["real"], result["model"])
    rows = [[i, f"{r:.1f}", f"{m:.1f}", f"{m - r:.1f}"] for i, (r, m) in enumerate(pairs)]
    rows.append(["mean", f"{result['real_mean']:.1f}", f"{result['model_mean']:.1f}", f"{result['gap']:.1f}"])
    markdown = "\n\n".join(
        [
            "# Value gap of SAC trained only in the model (Pendulum-v1)",
            __doc__.split("\n\n")[0].replace("\n", " "),
            "## Machine\n\n" + machine_md(info) + f"\n- wall time: {seconds:.0f} s, torch threads: {args['threads']}",
            f"Setup: {args['rounds']} rounds of {args['real_steps']} real transitions (random in the first round, "
            f"then the SAC policy), {args['updates']} world-model updates and {args['sb3_steps']:,} imagined "
            f"transitions for SAC ({args['num_envs']} imagined envs in one batch, branches of {args['horizon']} steps "
            f"from replay states, {args['gradient_steps']} gradient steps per batched step). Evaluation: "
            f"{args['eval_episodes']} deterministic episodes, episode i from the same start in both environments.",
            md_table(["episode", "real return", "model return", "model − real"], rows),
        ]
    )
    write_outputs(DEFAULT_OUT, "value_gap", {"machine": info, "seconds": seconds, **result}, markdown)


if __name__ == "__main__":
    main()
