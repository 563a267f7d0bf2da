"""A trained agent you can load and act with: world model, planner, value and prior, in the env's own units.

    agent = loopwm.load_agent("runs/pendulum/checkpoints/latest.pt")
    obs, _ = env.reset(seed=0)
    agent.reset()
    obs, reward, terminated, truncated, _ = env.step(agent.act(obs))   # a torque in [-2, 2] for Pendulum

`PlanningAgent` is a policy in the sense of `loopwm.envs.rollouts` (callable, with `reset`), so it plugs
into `value_gap` and anything else that takes ``policy(obs) -> action``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Discrete, Space

from loopwm.checkpoint import load_run
from loopwm.config import Config
from loopwm.envs.factory import action_from_model
from loopwm.envs.model_io import check_compatible, model_action_space
from loopwm.envs.registration import real_env
from loopwm.envs.starts import check_obs
from loopwm.train import resolve_device
from loopwm.world_model import WorldModel

from .planner import Planner, build_planner
from .value import PolicyPrior, ValueFunction


def planning_parts(
    cfg: Config, wm: WorldModel, *, seed: Optional[int] = None
) -> tuple[Optional[ValueFunction], Optional[PolicyPrior], Planner]:
    """The value, policy prior and planner that `cfg.agent` and `cfg.planner` ask for, on `wm`'s device."""
    a, device = cfg.agent, wm.device
    value = ValueFunction(wm.latent_dim, a, device=device) if a.use_value else None
    prior = (
        PolicyPrior(wm.latent_dim, wm.action_dim, wm.discrete, a, groups=wm.action_groups, device=device)
        if a.use_policy_prior
        else None
    )
    exploration = a.exploration_std if not wm.discrete else min(a.exploration_std, 1.0)
    planner = build_planner(
        cfg, wm, value=value, prior=prior, seed=cfg.seed if seed is None else seed, exploration=exploration
    )
    return value, prior, planner


class PlanningAgent:
    """Plans with the world model from real observations and returns actions in the environment's units.

    `act` validates the observation (shape, finite values), plans from it (warm-starting from the previous
    plan within an episode) and maps the planner's [-1, 1] action onto the action space's bounds (an
    integer for Discrete, one per entry for MultiDiscrete and MultiBinary). Call `reset` at every episode
    start. By default it acts with the planner's mean; ``explore=True`` samples with the configured
    exploration noise instead. Every draw (the planner's samples, the prior's) comes from the planner's own
    generator, seeded by `load_agent(seed=...)`: two agents with the same seed act alike, and acting leaves
    torch's global generator alone.
    """

    def __init__(
        self,
        wm: WorldModel,
        planner: Planner,
        value: Optional[ValueFunction] = None,
        prior: Optional[PolicyPrior] = None,
        *,
        cfg: Optional[Config] = None,
        action_space: Optional[Space] = None,
        explore: bool = False,
    ):
        self.wm, self.planner, self.value, self.prior = wm, planner, value, prior
        self.cfg = cfg
        self.action_space = action_space if action_space is not None else model_action_space(wm.spec)
        check_compatible(wm.spec, None, self.action_space, "the action space given")
        self.explore = explore
        self._t0 = True

    def reset(self) -> None:
        """A new episode: plan from scratch at the next `act`."""
        self.planner.reset()
        self._t0 = True

    def act(self, obs: Any) -> Union[np.ndarray, int]:
        """The planned action for one real observation, in the environment's own units."""
        obs = check_obs(obs, tuple(self.wm.spec.obs_shape), "observation given to act()")
        action = action_from_model(
            self.planner.model_action(obs, eval_mode=not self.explore, t0=self._t0), self.action_space
        )
        self._t0 = False
        return int(action) if isinstance(self.action_space, Discrete) else action

    __call__ = act


def load_agent(
    path: Union[str, Path],
    *,
    env: Union[None, str, gym.Env] = None,
    device: str = "cpu",
    seed: Optional[int] = None,
    explore: bool = False,
) -> PlanningAgent:
    """Load a trained agent from a checkpoint file or a run folder: the model, and the planner, value and
    prior its run used.

    Checkpoints of `loopwm run` carry the value and prior; a bare model checkpoint (`loopwm.save`) gets
    a planner without them, configured by the checkpoint's config or the defaults. With ``env`` (an id or
    an environment), its spaces are checked against the model's and a mismatch raises a ValueError.
    """
    run = load_run(path)
    wm = run.model.to(resolve_device(device)).eval()
    cfg = run.config or Config()
    action_space = None
    if env is not None:
        real, owned = real_env(env, cfg)
        try:
            check_compatible(
                wm.spec,
                real.observation_space,
                real.action_space,
                f"environment {real.spec.id if real.spec else real!s} (requested for {str(path)!r})",
            )
            action_space = real.action_space
        finally:
            if owned:
                real.close()
    if cfg.train.w_continue == 0:
        warnings.warn(
            f"{str(path)!r} was trained with train.w_continue=0: its continue head is untrained, so the "
            "planner discounts every imagined step by about 0.5; retrain it",
            stacklevel=2,
        )
    state = run.agent or {}
    if not state:  # a bare model: no value or prior was trained
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, use_value=False, use_policy_prior=False))
    value, prior, planner = planning_parts(cfg, wm, seed=seed)
    if value is not None:
        value.load_state_dict(state["value"])
    if prior is not None:
        prior.load_state_dict(state["prior"])
    return PlanningAgent(wm, planner, value, prior, cfg=cfg, action_space=action_space, explore=explore)
