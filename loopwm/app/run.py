"""`loopwm run`: the online loop. Seed with random actions, then plan, act, store, update and evaluate.

It acts in `env.num_envs` environments at once (`VectorCollector`), with one batched planner call per
step of all of them; step counts advance by `env.num_envs` per such step.
Checkpoints hold the world model, its optimiser, the replay buffer, value function, policy prior,
every RNG and the counters. A resumed run restarts the episodes that were in progress (environments
cannot be checkpointed), so checkpoints are taken at episode ends, where nothing is lost.
"""

from __future__ import annotations

import json
import resource
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from loopwm.agents.collector import VectorCollector
from loopwm.agents.online import Agent, evaluate
from loopwm.app.session import RunSession, seed_everything
from loopwm.config import Config
from loopwm.envs.factory import check_episode_limit, check_model_fits, make_vector_env
from loopwm.train import NonFiniteLoss


@dataclass
class Progress:
    """Counters and the learning curve; all plain data so it checkpoints with weights_only."""

    step: int = 0
    episode: int = 0
    updates_due: float = 0.0
    episode_returns: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # [step, mean, std] per evaluation
    elapsed_s: float = 0.0  # wall-clock seconds of the loop, summed over every sitting of a resumed run
    peak_rss_mib: float = 0.0  # the largest resident memory any sitting reached


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """The online loop in the run folder `run_dir/name`; returns the learning curve and final evaluation."""
    check_episode_limit(cfg)
    with RunSession(cfg, "run") as session:
        seed_everything(cfg.seed, cfg.threads)
        envs = make_vector_env(cfg.env, training=True, autoreset=gym.vector.AutoresetMode.DISABLED)
        with closing(envs):
            spaces = envs.single_observation_space, envs.single_action_space
            check_model_fits(cfg.model, *spaces, cfg.env.id)
            agent = Agent(cfg, *spaces, session.logger)
            collector = VectorCollector(envs, agent.replay, seed=cfg.seed)
            session.start(agent.wm.spec)
            state = Progress()
            payload = session.restore(agent.trainer, log_step=lambda p: p["progress"]["step"])
            if payload is not None:
                agent.load_state_dict(payload["agent"])
                state = Progress(**payload["progress"])
                if "collector" in payload:
                    collector.load_state_dict(payload["collector"])
                else:  # a checkpoint from before collectors had state
                    collector.start_at(state.episode)
            _loop(cfg, session, collector, agent, state, progress)
        summary = {
            "curve": state.curve,
            "episodes": state.episode,
            "updates": agent.trainer.updates,
            "kappa": agent.wm.certified_lipschitz(),
            "elapsed_s": state.elapsed_s,
            "peak_rss_mib": state.peak_rss_mib,
        }
        session.write_text("summary.json", json.dumps(summary, indent=2))
    if progress:
        print(format_curve(state.curve))
    return summary


def _loop(
    cfg: Config, session: RunSession, collector: VectorCollector, agent: Agent, state: Progress, progress: bool
) -> None:
    """Act, store, update and evaluate until `agent.total_steps`, or until a stop signal; then save."""
    from tqdm.auto import tqdm

    a, logger, stop = cfg.agent, session.logger, session.stop
    if state.step >= a.total_steps and session.latest.is_file():
        return  # a finished run resumed: its checkpoint, and the wall-clock time it ran for, stand as they are
    sitting_start, elapsed_before = time.monotonic(), state.elapsed_s

    def clock() -> None:  # the time and memory counters, brought up to now
        state.elapsed_s = elapsed_before + time.monotonic() - sitting_start
        state.peak_rss_mib = max(state.peak_rss_mib, peak_rss_mib())

    saved_at: list[int] = []  # the step of this sitting's last checkpoint

    def checkpoint() -> None:
        clock()
        session.save(agent.trainer, agent=agent.state_dict(), progress=vars(state), collector=collector.state_dict())
        saved_at[:] = [state.step]

    def keep_or_checkpoint() -> None:
        """After a stop signal or an error: the last checkpoint, saved at an episode end, stands, so the resumed
        run repeats the steps since then and ends exactly as an uninterrupted one (a checkpoint here, mid-episode,
        would drop the open episode's transitions that the step count already holds). A run stopped before its
        first checkpoint saves one where it stopped, rather than nothing."""
        if not session.latest.is_file():
            checkpoint()

    def random_policy(obs: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return agent.random_actions(len(obs))

    def planner_policy(obs: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return agent.planned_action(obs, eval_mode=False, t0=starts, batched=True)

    def crossed(every: int, before: int) -> bool:  # the last step reached a multiple of `every`
        return state.step // every > before // every

    def evaluation() -> None:
        result = evaluate(agent, a.eval_episodes, seed=10_000 + state.step, frames=a.eval_video)
        if a.eval_video:
            logger.log_video("eval/video", result.pop("frames"), state.step, fps=result.pop("fps"))
        state.curve.append([state.step, result["return_mean"], result["return_std"]])
        clock()
        logger.log(
            {
                "eval/return_mean": result["return_mean"],
                "eval/return_std": result["return_std"],
                "eval/ms_per_decision": result["ms_per_decision"],
                "perf/elapsed_s": state.elapsed_s,
                "perf/peak_rss_mib": state.peak_rss_mib,
            },
            state.step,
        )
        bar.write(
            f"step {state.step:>7}: eval return {result['return_mean']:9.1f} ± "
            f"{result['return_std']:.1f}  ({result['ms_per_decision']:.1f} ms/decision)"
        )

    bar = tqdm(total=a.total_steps, initial=state.step, disable=not progress, desc="run", dynamic_ncols=True)
    try:
        if state.step == 0 and not state.curve and stop.received is None:  # the planner on the untrained model
            evaluation()
        collector.restart()  # every env starts (a resumed run: restarts) its current episode from its seed
        stats_set = state.step >= a.seed_steps
        last_saved = agent.trainer.updates
        while state.step < a.total_steps and stop.received is None:
            before = state.step
            returns = collector.step(random_policy if state.step < a.seed_steps else planner_policy)
            state.step += collector.num_envs
            if state.step >= a.seed_steps and len(agent.replay) > 0:
                if not stats_set:
                    stats = agent.replay.stats()
                    agent.wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
                    stats_set = True
                    state.updates_due += a.seed_steps * a.updates_per_step  # pretrain on the seed data
                state.updates_due += a.updates_per_step * collector.num_envs
                if crossed(a.update_every, before):
                    while state.updates_due >= 1.0:
                        for key, value in agent.update().items():
                            agent.trainer.record(key, value)
                        state.updates_due -= 1.0
                    agent.trainer.record("agent/plan_loops", agent.planner.last_stats.get("loops", 0.0))
                    if crossed(cfg.train.log_every, before):
                        agent.trainer.flush_logs(step=state.step)
            for episode_return in returns:
                state.episode_returns.append(episode_return)
                logger.log({"episode/return": episode_return}, state.step)
                bar.set_postfix(ret=f"{episode_return:.1f}", loops=f"{agent.planner.last_stats.get('loops', 0):.1f}")
                state.episode += 1
            if crossed(a.eval_every, before) or state.step >= a.total_steps:
                evaluation()
            if returns and agent.trainer.updates - last_saved >= cfg.train.checkpoint_every:
                checkpoint()  # after this step's evaluation, so a resumed run neither repeats nor skips it
                last_saved = agent.trainer.updates
            bar.update(collector.num_envs)
    except OSError:
        raise  # a write failed: the last checkpoint stands, and saving again would fail the same way
    except NonFiniteLoss:
        raise  # the error names the last good checkpoint: it stays as it is
    except BaseException:
        keep_or_checkpoint()  # an error or a second signal
        raise
    finally:
        bar.close()
    if stop.received is None:
        checkpoint()  # the finished run
        return
    keep_or_checkpoint()
    kept = f"step {saved_at[0]}'s checkpoint" if saved_at else "its last checkpoint"
    stop.exit_if_received(f"at step {state.step}; {kept} continues with resume=true")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_curve(curve: list) -> str:
    """The learning curve as a terminal table."""
    lines = [f"{'env steps':>10} | {'eval return':>12} | {'std':>8}", "-" * 36]
    lines += [f"{int(s):>10} | {m:12.1f} | {sd:8.1f}" for s, m, sd in curve]
    return "\n".join(lines)
