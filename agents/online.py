"""The online agent: world model, trainer, value, prior and planner wired together, and its evaluation.

`loopwm.app.run` drives it (seed steps, then plan, act, store, update, evaluate); everything it holds
checkpoints through `Agent.state_dict` and the trainer's own state.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from loopwm.config import Config
from loopwm.envs.factory import action_from_model, make_env, replay_buffer
from loopwm.logger import RunLogger
from loopwm.train import Trainer, resolve_device
from loopwm.world_model import WorldModel

from .planning_agent import planning_parts


def random_model_actions(wm: Any, rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random actions in model units [n, A]: uniform in [-1, 1], or a random one-hot per group."""
    if not wm.discrete:
        return rng.uniform(-1, 1, (n, wm.action_dim)).astype(np.float32)
    return np.concatenate([np.eye(k, dtype=np.float32)[rng.integers(k, size=n)] for k in wm.action_groups], -1)


class Agent:
    """World model + trainer + value + prior + planner, wired together for one environment."""

    def __init__(self, cfg: Config, obs_space: Any, act_space: Any, logger: Optional[RunLogger] = None):
        self.cfg, self.act_space = cfg, act_space
        device = resolve_device(cfg.device)
        self.wm = WorldModel.from_config(cfg, obs_space, act_space).to(device)
        self.replay = replay_buffer(cfg, obs_space, act_space)
        planned = round(cfg.agent.total_steps * cfg.agent.updates_per_step)  # seed-data pretraining included
        self.trainer = Trainer(self.wm, cfg, self.replay, logger, planned_updates=planned)
        self.value, self.prior, self.planner = planning_parts(cfg, self.wm)
        self.rng = np.random.default_rng(cfg.seed + 1)

    def random_actions(self, n: int) -> np.ndarray:
        """n uniformly random actions in model units [n, A] (seeded by the agent's own generator)."""
        return random_model_actions(self.wm, self.rng, n)

    def planned_action(
        self, obs: np.ndarray, *, eval_mode: bool, t0: bool | np.ndarray, batched: bool = False
    ) -> np.ndarray:
        """The planner's action for one observation (or, `batched`, for a batch in one call), in model units."""
        return self.planner.model_action(obs, eval_mode=eval_mode, t0=t0, batched=batched)

    def update(self) -> dict[str, float]:
        """One world-model update, then value and prior updates on fresh replay latents.

        The value regresses on the replay λ-returns and on the prior's imagined return from each latent: with the
        reinforce actor the λ-return of the rollout the actor learns from (bootstrapped from the target value
        along the way, DreamerV3's critic target), otherwise the H-step discounted return bootstrapped at its end.
        """
        out = self.trainer.update()
        if self.value is None and self.prior is None:
            return out
        t = self.cfg.train
        batch = self.replay.sample(t.batch_size, t.horizon, self.trainer.rng)
        device = self.wm.device
        with torch.no_grad():
            latents = self.wm.encode(batch["obs"].to(device))
        continues = 1.0 - batch["terminated"].float().to(device)
        starts = latents[:-1].reshape(-1, latents.shape[-1])  # every replay latent but each sequence's last
        rollout = None  # the reinforce actor's imagined rollout: it trains the actor and gives the value a target
        if self.prior is not None and self.prior.gradient == "reinforce":
            rollout = self.prior.rollout(self.wm, starts, self.value.target_value if self.value is not None else None)
        if self.value is not None:
            imagined = None  # value of the improving prior, from its imagined rollouts
            if rollout is not None:
                imagined = rollout.returns[0]
            elif self.prior is not None:
                with torch.no_grad():
                    imagined = self.prior.imagined_return(self.wm, starts, self.value.target_value)[0]
            if imagined is not None:
                imagined = imagined.view(latents.shape[0] - 1, -1)
            out.update(
                {
                    f"value/{k}": v
                    for k, v in self.value.update(
                        latents, batch["rewards"].to(device), continues, imagined=imagined
                    ).items()
                }
            )
        if self.prior is not None:
            # backpropagating through the model, one start per sequence keeps the update cheap; the reinforce
            # rollout, without gradients, starts from every replay latent
            actor_starts = starts if rollout is not None else latents[0]
            stats = self.prior.update(self.wm, actor_starts, self.value, rollout=rollout)
            out.update({f"prior/{k}": v for k, v in stats.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value.state_dict() if self.value else None,
            "prior": self.prior.state_dict() if self.prior else None,
            "planner": self.planner.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.value is not None:
            self.value.load_state_dict(state["value"])
        if self.prior is not None:
            self.prior.load_state_dict(state["prior"])
        self.planner.load_state_dict(state["planner"])
        self.rng.bit_generator.state = state["rng"]


def evaluate(
    agent: Agent, episodes: int, seed: int, video_dir: Optional[str] = None, frames: bool = False
) -> dict[str, Any]:
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
    result = {
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "returns": returns,
        "ms_per_decision": 1000.0 * plan_time / max(decisions, 1),
    }
    if frames:
        result.update(frames=np.stack(video), fps=fps)  # the first episode, [T, H, W, 3]
    return result
