"""`VectorCollector`: the online loop's environments, `env.num_envs` of them acting at once.

One `step` asks the policy for every environment's action in one call (one batched planner call), steps
the Gymnasium vector env, streams the transitions into the replay and resets the environments whose
episode ended. The k-th episode the run starts is seeded `seed + k`, so with one environment the
episodes are those of a plain `env.reset(seed=seed + k)` loop. Its state (which seed each
environment's current episode has) checkpoints; a resumed run restarts each environment's current
episode from that seed, which continues the run exactly when the checkpoint was taken as every
episode ended (fixed-length tasks such as Pendulum end them together).
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np

from loopwm.envs.factory import action_from_model
from loopwm.replay import ReplayBuffer

# (observations [N, ...], episode starts [N] bool) -> actions in model units [N, A]
Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]


class VectorCollector:
    """Owns a vector env (autoreset disabled: it resets finished episodes itself, with their seeds), the
    per-environment episode state, and the stream of transitions into `replay`."""

    def __init__(self, envs: gym.vector.VectorEnv, replay: ReplayBuffer, seed: int):
        if envs.metadata.get("autoreset_mode") != gym.vector.AutoresetMode.DISABLED:
            raise ValueError(
                "VectorCollector needs a vector env made with autoreset_mode=AutoresetMode.DISABLED "
                f"(got {envs.metadata.get('autoreset_mode')}): it seeds every new episode itself"
            )
        self.envs, self.replay, self.seed = envs, replay, seed
        self.num_envs = envs.num_envs
        self.episode_seeds = [seed + i for i in range(self.num_envs)]  # of each env's current episode
        self.started = self.num_envs  # episodes started so far; the next one is seeded seed + started
        self.returns = np.zeros(self.num_envs)
        self.starts = np.ones(self.num_envs, dtype=bool)  # obs is the first of an episode: plan from scratch
        self.obs: Any = None

    def restart(self) -> None:
        """(Re)start every environment's current episode from its seed, dropping the transitions of
        episodes still streaming into the replay (an environment's state cannot be checkpointed)."""
        self.replay.discard_open()
        self.obs, _ = self.envs.reset(seed=list(self.episode_seeds))
        self.returns[:] = 0.0
        self.starts[:] = True

    def step(self, policy: Policy) -> list[float]:
        """Act once in every environment with `policy`'s actions; returns the returns of the episodes that
        ended (their environments are already reset for the next step)."""
        if self.obs is None:
            raise RuntimeError("VectorCollector.step before restart()")
        actions = policy(self.obs, self.starts)
        next_obs, rewards, terminated, truncated, _ = self.envs.step(
            action_from_model(actions, self.envs.single_action_space)
        )
        self.replay.add_batch(self.obs, actions, rewards, next_obs, terminated, truncated, autoreset="disabled")
        self.returns += rewards
        done = terminated | truncated
        finished = self.returns[done].tolist()
        if done.any():
            for i in np.flatnonzero(done):
                self.episode_seeds[i] = self.seed + self.started
                self.started += 1
            seeds = [s if d else None for s, d in zip(self.episode_seeds, done)]
            next_obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": done})
            self.returns[done] = 0.0
        self.obs, self.starts = next_obs, done
        return finished

    def state_dict(self) -> dict[str, Any]:
        return {"episode_seeds": list(self.episode_seeds), "started": self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; saved with another `env.num_envs`, every env starts a new episode."""
        seeds, started = [int(s) for s in state["episode_seeds"]], int(state["started"])
        if len(seeds) == self.num_envs:
            self.episode_seeds, self.started = seeds, started
        else:
            self.start_at(started)

    def start_at(self, episode: int) -> None:
        """Give the envs episodes `episode`, `episode + 1`, ... (also for checkpoints written before collectors
        had state: with one env and `episode` = the episodes finished, that restarts the one in progress)."""
        self.episode_seeds = [self.seed + episode + i for i in range(self.num_envs)]
        self.started = episode + self.num_envs

    def close(self) -> None:
        self.envs.close()
