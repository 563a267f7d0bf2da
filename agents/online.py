"""The online loop behind `loopwm run`: seed with random actions, then plan, act, store, update and evaluate.

Checkpoints hold the world model, its optimiser, the replay buffer, value function, policy prior,
every RNG and the counters. A resumed run restarts the episode that was in progress (environments
cannot be checkpointed), so checkpoints are taken at episode ends, where nothing is lost.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from loopwm.config import Config
from loopwm.envs.factory import action_from_model, make_env
from loopwm.logger import RunLogger
from loopwm.train import StopSignal, Trainer, resolve_device, restore_run, save_run, seed_everything
from loopwm.workflows import new_buffer, prepare_run_dir, run_dir
from loopwm.world_model import WorldModel

from .planning_agent import planning_parts


def random_model_actions(wm: Any, rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random actions in model units [n, A]: uniform in [-1, 1], or a random one-hot per group."""
    if not wm.discrete:
        return rng.uniform(-1, 1, (n, wm.action_dim)).astype(np.float32)
    return np.concatenate([np.eye(k, dtype=np.float32)[rng.integers(k, size=n)] for k in wm.action_groups], -1)


@dataclass
class Progress:
    """Counters and the learning curve; all plain data so it checkpoints with weights_only."""

    step: int = 0
    episode: int = 0
    updates_due: float = 0.0
    episode_returns: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # [step, mean, std] per evaluation


class Agent:
    """World model + trainer + value + prior + planner, wired together for one environment."""

    def __init__(self, cfg: Config, obs_space: Any, act_space: Any, logger: Optional[RunLogger] = None):
        self.cfg, self.act_space = cfg, act_space
        device = resolve_device(cfg.device)
        self.wm = WorldModel.from_config(cfg, obs_space, act_space).to(device)
        self.replay = new_buffer(cfg, obs_space, act_space)
        self.trainer = Trainer(self.wm, cfg, self.replay, logger)
        self.value, self.prior, self.planner = planning_parts(cfg, self.wm)
        self.rng = np.random.default_rng(cfg.seed + 1)

    def random_action(self) -> np.ndarray:
        """A uniformly random action in model units (seeded by the agent's own generator)."""
        return random_model_actions(self.wm, self.rng, 1)[0]

    def planned_action(self, obs: np.ndarray, *, eval_mode: bool, t0: bool) -> np.ndarray:
        """The planner's action for one observation, in model units."""
        return self.planner.model_action(obs, eval_mode=eval_mode, t0=t0)

    def update(self) -> dict[str, float]:
        """One world-model update, then value and prior updates on fresh replay latents."""
        out = self.trainer.update()
        if self.value is None and self.prior is None:
            return out
        t = self.cfg.train
        batch = self.replay.sample(t.batch_size, t.horizon, self.trainer.rng)
        device = self.wm.device
        with torch.no_grad():
            latents = self.wm.encode(batch["obs"].to(device))
        continues = 1.0 - batch["terminated"].float().to(device)
        if self.value is not None:
            imagined = None
            if self.prior is not None:  # value of the improving prior, from its imagined rollouts
                with torch.no_grad():
                    starts = latents[:-1].reshape(-1, latents.shape[-1])
                    imagined, _ = self.prior.imagined_return(self.wm, starts, self.value.target_value)
                imagined = imagined.view(latents.shape[0] - 1, -1)
            out.update({f"value/{k}": v for k, v in
                        self.value.update(latents, batch["rewards"].to(device), continues, imagined=imagined).items()})
        if self.prior is not None:
            starts = latents[0]  # one start latent per sequence keeps the actor update cheap
            out.update({f"prior/{k}": v for k, v in self.prior.update(self.wm, starts, self.value).items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.state_dict() if self.value else None,
                "prior": self.prior.state_dict() if self.prior else None,
                "planner": self.planner.state_dict(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.value is not None:
            self.value.load_state_dict(state["value"])
        if self.prior is not None:
            self.prior.load_state_dict(state["prior"])
        self.planner.load_state_dict(state["planner"])
        self.rng.bit_generator.state = state["rng"]


def evaluate(agent: Agent, episodes: int, seed: int, video_dir: Optional[str] = None,
             frames: bool = False) -> dict[str, Any]:
    """Return of the deterministic planner over `episodes` fresh evaluation episodes (rewards unclipped).

    Evaluation leaves every training RNG as it found it, so evaluating never changes what training does.
    """
    planner_state = agent.planner.state_dict()
    with torch.random.fork_rng(devices=[]):
        result = _evaluate(agent, episodes, seed, video_dir, frames)
    agent.planner.load_state_dict(planner_state)
    return result


def _evaluate(agent: Agent, episodes: int, seed: int, video_dir: Optional[str], frames: bool) -> dict[str, Any]:
    env = make_env(agent.cfg.env, render_mode="rgb_array" if video_dir or frames else None, training=False)
    if video_dir:
        from gymnasium.wrappers import RecordVideo

        env = RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
    returns, decisions, plan_time, video = [], 0, 0.0, []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total, t0 = False, 0.0, True
        while not done:
            if frames and i == 0:
                video.append(env.render())
            start = time.perf_counter()
            action = agent.planned_action(obs, eval_mode=True, t0=t0)
            plan_time += time.perf_counter() - start
            decisions += 1
            obs, reward, terminated, truncated, _ = env.step(action_from_model(action, agent.act_space))
            total += float(reward)
            done, t0 = terminated or truncated, False
        returns.append(total)
    fps = int(env.metadata.get("render_fps") or 30)
    env.close()
    agent.planner.reset()
    result = {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
              "returns": returns, "ms_per_decision": 1000.0 * plan_time / max(decisions, 1)}
    if frames:
        result.update(frames=np.stack(video), fps=fps)  # the first episode, [T, H, W, 3]
    return result


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """The online loop; returns the learning curve and final evaluation."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed, cfg.threads)
    latest = run_dir(cfg) / "checkpoints" / "latest.pt"
    folder = prepare_run_dir(cfg, latest)
    env = make_env(cfg.env, training=True)
    logger = RunLogger.for_config(folder, cfg)
    agent = Agent(cfg, env.observation_space, env.action_space, logger)
    state = Progress()
    if cfg.resume and latest.exists():
        payload = restore_run(latest, agent.trainer)
        agent.load_state_dict(payload["agent"])
        state = Progress(**payload["progress"])
        agent.replay.discard_open()
        logger.rewind(state.step)
    a = cfg.agent

    def checkpoint() -> None:
        save_run(latest, agent.trainer, agent=agent.state_dict(), progress=vars(state))

    def evaluation() -> None:
        result = evaluate(agent, a.eval_episodes, seed=10_000 + state.step, frames=a.eval_video)
        if a.eval_video:
            logger.log_video("eval/video", result.pop("frames"), state.step, fps=result.pop("fps"))
        state.curve.append([state.step, result["return_mean"], result["return_std"]])
        logger.log({"eval/return_mean": result["return_mean"], "eval/return_std": result["return_std"],
                    "eval/ms_per_decision": result["ms_per_decision"]}, state.step)
        bar.write(f"step {state.step:>7}: eval return {result['return_mean']:9.1f} ± "
                  f"{result['return_std']:.1f}  ({result['ms_per_decision']:.1f} ms/decision)")

    bar = tqdm(total=a.total_steps, initial=state.step, disable=not progress, desc="run", dynamic_ncols=True)
    if state.step == 0 and not state.curve:  # where learning starts: the planner on the untrained model
        evaluation()
    obs, _ = env.reset(seed=cfg.seed + state.episode)
    episode_return, t0, stats_set = 0.0, True, state.step >= a.seed_steps
    last_saved = agent.trainer.updates
    with StopSignal() as stop:  # a killed run saves its checkpoint at the next step boundary
        try:
            while state.step < a.total_steps and stop.received is None:
                if state.step < a.seed_steps:
                    action = agent.random_action()
                else:
                    action = agent.planned_action(obs, eval_mode=False, t0=t0)
                next_obs, reward, terminated, truncated, _ = env.step(action_from_model(action, env.action_space))
                agent.replay.add(obs, action, reward, next_obs, terminated, truncated)
                episode_return += float(reward)
                obs, t0 = next_obs, False
                state.step += 1
                if state.step >= a.seed_steps and len(agent.replay) > 0:
                    if not stats_set:
                        stats = agent.replay.stats()
                        agent.wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
                        stats_set = True
                        state.updates_due += a.seed_steps * a.updates_per_step  # pretrain on the seed data
                    state.updates_due += a.updates_per_step
                    if state.step % a.update_every == 0:
                        while state.updates_due >= 1.0:
                            for key, value in agent.update().items():
                                agent.trainer.record(key, value)
                            state.updates_due -= 1.0
                        agent.trainer.record("agent/plan_loops", agent.planner.last_stats.get("loops", 0.0))
                        if state.step % cfg.train.log_every == 0:
                            agent.trainer.flush_logs(step=state.step)
                if terminated or truncated:
                    state.episode_returns.append(episode_return)
                    logger.log({"episode/return": episode_return}, state.step)
                    bar.set_postfix(ret=f"{episode_return:.1f}",
                                    loops=f"{agent.planner.last_stats.get('loops', 0):.1f}")
                    state.episode += 1
                    obs, _ = env.reset(seed=cfg.seed + state.episode)
                    episode_return, t0 = 0.0, True
                if state.step % a.eval_every == 0 or state.step == a.total_steps:
                    evaluation()
                if (terminated or truncated) and agent.trainer.updates - last_saved >= cfg.train.checkpoint_every:
                    checkpoint()  # after this step's evaluation, so a resumed run neither repeats nor skips it
                    last_saved = agent.trainer.updates
                bar.update(1)
        finally:
            bar.close()
            checkpoint()
            logger.close()
            env.close()
        stop.exit_if_received()
    summary = {"curve": state.curve, "episodes": state.episode, "updates": agent.trainer.updates,
               "kappa": agent.wm.certified_lipschitz()}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if progress:
        print(format_curve(state.curve))
    return summary


def format_curve(curve: list) -> str:
    """The learning curve as a terminal table."""
    lines = [f"{'env steps':>10} | {'eval return':>12} | {'std':>8}", "-" * 36]
    lines += [f"{int(s):>10} | {m:12.1f} | {sd:8.1f}" for s, m, sd in curve]
    return "\n".join(lines)


def evaluate_planner(path: str | Path, episodes: int, video_dir: Optional[str] = None) -> dict[str, Any]:
    """`loopwm eval CKPT --episodes N`: run the saved agent's planner (with its value and prior)."""
    from loopwm.checkpoint import config_from_payload, read_checkpoint

    payload = read_checkpoint(path)
    cfg = config_from_payload(payload, path) or Config()
    env = make_env(cfg.env)
    agent = Agent(cfg, env.observation_space, env.action_space)
    env.close()
    agent.wm.load_state_dict(payload["model"])
    if "agent" in payload:
        agent.load_state_dict(payload["agent"])
    return evaluate(agent, episodes, seed=cfg.seed + 20_000, video_dir=video_dir)
