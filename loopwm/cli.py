"""The `loopwm` command: run, train, collect, eval and analyze. It parses arguments and calls `loopwm.app`;
heavy imports happen inside each command, so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence


def _config(args: argparse.Namespace):
    from loopwm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_run(args: argparse.Namespace) -> None:
    from loopwm.app.run import run

    run(_config(args), progress=not args.quiet)


def cmd_train(args: argparse.Namespace) -> None:
    from loopwm.app.train import train

    train(_config(args), progress=not args.quiet)


def cmd_collect(args: argparse.Namespace) -> None:
    from loopwm.app.collect import collect

    buffer = collect(_config(args), progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {len(buffer)} transitions in {buffer.num_episodes} episodes")


def cmd_eval(args: argparse.Namespace) -> None:
    from loopwm.config import ConfigError

    playing = args.episodes is not None or args.video is not None
    misplaced = [
        flag
        for flag, given, wanted in (
            ("--data", args.data, not playing),
            ("--exit", args.exit, not playing),
            ("--seed", args.seed, playing),
            ("--imagine-steps", args.imagine_steps, args.video is not None),
        )
        if given is not None and not wanted
    ]
    if misplaced:
        raise ConfigError(
            f"{', '.join(misplaced)} does not apply here: --data and --exit go with prediction errors (no "
            "--episodes or --video), --seed with --episodes or --video, --imagine-steps with --video"
        )
    if args.video is not None:
        result = _eval_video(args)
    elif playing:
        from loopwm.app.evaluate import evaluate_planner

        result = evaluate_planner(args.checkpoint, args.episodes, seed=args.seed)
        _print_returns(result)
    else:
        from loopwm.analysis.prediction import format_table
        from loopwm.app.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, args.data, args.exit)
        print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def _eval_video(args: argparse.Namespace) -> dict:
    from loopwm.app.video import record_videos

    steps = args.imagine_steps or 50
    result = record_videos(args.checkpoint, args.video, args.episodes or 1, imagine_steps=steps, seed=args.seed)
    _print_returns(result)
    for path in result["videos"]:
        print(f"wrote {path}")
    done = result["imagined_steps"]
    ended = f" (the episode ended after {done} of {steps})" if done < steps else ""
    print(f"wrote {result['imagined']}: real vs imagined, open loop for {done} steps{ended}")
    return result


def _print_returns(result: dict) -> None:
    episodes = len(result["returns"])
    print(
        f"return {result['return_mean']:.1f} ± {result['return_std']:.1f} over {episodes} episodes; "
        f"{result['ms_per_decision']:.1f} ms per decision"
    )


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def cmd_analyze(args: argparse.Namespace) -> None:
    from loopwm.app.analyze import analyze_checkpoint

    report = analyze_checkpoint(args.checkpoint, data=args.data, out_dir=args.out, compare=args.compare)
    print(f"wrote {Path(args.out) / 'report.md'} ({len(report)} sections)")


def _exit_rule(name: str) -> str:
    """An argparse type: the name of a registered exit rule (imported only when the option is given)."""
    from loopwm.config import ConfigError
    from loopwm.exits import check_exit

    try:
        check_exit(name)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def cmd_plot(args: argparse.Namespace) -> None:
    from loopwm.app.plot import plot_runs

    groups = plot_runs(args.runs, args.out)
    print(f"wrote {args.out} ({len(args.runs)} runs in {len(groups)} groups)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopwm", description="Looped latent world models for Gymnasium.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
        p.set_defaults(fn=fn)
        return p

    with_config("run", "Online loop: collect, fit the world model, plan and evaluate.", cmd_run)
    with_config("train", "Fit a world model on a saved dataset (data.path).", cmd_train)
    p = with_config("collect", "Write a dataset of environment transitions to data.path.", cmd_collect)
    p.add_argument("--overwrite", action="store_true", help="replace data.path if it exists (refused otherwise)")
    p = sub.add_parser(
        "eval",
        help="Prediction errors of a checkpoint, planner returns with --episodes, or videos with --video.",
        description="Prediction errors of a checkpoint, planner returns with --episodes, or videos with --video.",
    )
    p.add_argument("checkpoint", help="a run folder or a checkpoint file")
    p.add_argument("--data", help="held-out dataset (.npz); default: the run's own held-out split")
    p.add_argument("--exit", type=_exit_rule, help="override the exit rule (a name in loopwm.exits.EXIT_RULES)")
    p.add_argument("--episodes", type=_int_at_least(1), help="run the planner for N >= 1 episodes instead")
    p.add_argument(
        "--video",
        metavar="DIR",
        help="record the planner's episodes (MP4, default 1 episode) and the model's open-loop imagination next "
        "to the real frames (imagined.gif; imagined.png for vector observations) into DIR",
    )
    p.add_argument(
        "--imagine-steps", type=_int_at_least(1), metavar="N", help="steps of the --video imagined rollout (default 50)"
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(0),
        help="seed of the first --episodes/--video episode (default: the run's seed + 20000)",
    )
    p.add_argument("--out", help="write the JSON result here")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser(
        "analyze",
        help="Stability report: figures, report.json and report.md.",
        description="Stability report: figures, report.json and report.md.",
    )
    p.add_argument("checkpoint", help="a run folder or a checkpoint file")
    p.add_argument("--data", help="dataset (.npz); default: the run's held-out split")
    p.add_argument("--out", default="analysis", help="output folder")
    p.add_argument("--compare", help="a paper-mode checkpoint to compare long-horizon behaviour with")
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser(
        "plot",
        help="Learning curves of runs (mean and spread across seeds) and losses, as a PNG.",
        description="Learning curves of runs (mean and spread across seeds) and losses, as a PNG.",
    )
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", default="plot.png", help="PNG to write")
    p.set_defaults(fn=cmd_plot)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # OpenMP threads that spin while waiting collapse throughput when anything else shares the cores;
    # passive waiting costs little when idle. Set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Videos are rendered off-screen (rgb_array); without a display SDL would complain on stderr.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option, e.g. `loopwm run cfg.yaml -q seed=1`
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    from loopwm.checkpoint import CheckpointError
    from loopwm.config import ConfigError
    from loopwm.distributed import launched_processes
    from loopwm.train import NonFiniteLoss

    try:
        if args.command != "train" and launched_processes() > 1:
            raise ConfigError(
                f"only `loopwm train` runs in several processes (torchrun); `loopwm {args.command}` "
                "runs in one (to act in several environments at once, set env.num_envs)"
            )
        args.fn(args)
    except (ConfigError, CheckpointError, OSError, ValueError, ImportError, NonFiniteLoss) as exc:
        print(f"loopwm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
