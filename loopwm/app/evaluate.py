"""`loopwm eval`: held-out prediction errors of a saved model, or the returns of a saved agent's planner."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from loopwm.agents.online import Agent, evaluate
from loopwm.analysis.prediction import prediction_errors
from loopwm.app.train import held_out_split, load_checked
from loopwm.checkpoint import load_run
from loopwm.config import ConfigError, apply_overrides, from_dict, to_dict
from loopwm.envs.factory import env_spaces
from loopwm.exits import LoopOptions


def evaluate_checkpoint(
    path: str | Path,
    data: Optional[str | Path] = None,
    exit: Optional[str] = None,
    horizons: tuple[int, ...] = (1, 10, 50),
) -> dict[str, Any]:
    """Held-out prediction errors of a saved model (a run folder or a checkpoint file), on its run's own
    held-out split or on the dataset `data`. A bare model needs `data`; its sequences are drawn with seed 0."""
    run = load_run(path)
    wm = run.model
    if data is not None:
        held_out, seed = load_checked(data, wm), run.config.seed if run.config is not None else 0
    else:
        cfg = run.require_config("there is no held-out split to evaluate on: pass --data")
        held_out, seed = held_out_split(cfg, wm, run.kind, run.payload.get("dataset_sha256")), cfg.seed
    options = LoopOptions.from_config(wm.cfg, exit=exit) if exit else None
    # vector models carry their training statistics; frames are normalised from the held-out data
    norm = {} if wm.spec.pixels else {"obs_mean": wm.obs_mean, "obs_var": wm.obs_std.pow(2)}
    return prediction_errors(wm, held_out, horizons, seed=seed, **norm, options=options)


def saved_agent(path: str | Path, overrides: Sequence[str] = ()) -> Agent:
    """The agent a run saved, rebuilt for its environment: the run's world model with the value, prior and
    planner it learnt (a run without them gets fresh ones, as its config asks). `overrides` (dotted
    key=value) change its config first, e.g. to act with another planner."""
    run = load_run(path)
    cfg = run.require_config("there is no environment or planner to evaluate it with: evaluate a run's checkpoint")
    if overrides:
        cfg = from_dict(apply_overrides(to_dict(cfg), list(overrides)))
    agent = Agent(cfg, *env_spaces(cfg.env))
    agent.wm.load_state_dict(run.model.state_dict())
    if run.agent is not None:
        agent.load_state_dict(run.agent)
    return agent


def eval_seed(agent: Agent, seed: Optional[int] = None) -> int:
    """The seed of the first evaluation episode: `seed`, or by default one the run never trained or evaluated on."""
    return agent.cfg.seed + 20_000 if seed is None else seed


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Refuse anything but an integer >= `minimum` for the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")


def evaluate_planner(path: str | Path, episodes: int, seed: Optional[int] = None) -> dict[str, Any]:
    """`loopwm eval RUN --episodes N`: run the saved agent's planner (with its value and prior, when the run
    learnt them) for N fresh episodes of its environment, episode i reset with seed + i."""
    check_count("episodes", episodes)
    if seed is not None:
        check_count("seed", seed, minimum=0)
    agent = saved_agent(path)
    return evaluate(agent, episodes, seed=eval_seed(agent, seed))
