"""`planner.method: policy`: act with the actor trained in imagination, with no search at decision time.

The policy prior (`agents.value.PolicyPrior`) learns by backpropagating imagined returns through the world
model, so acting with it alone is an actor-critic agent in the DreamerV3 manner: one encoder and one actor
forward per decision instead of `samples × horizon × iterations` imagined steps. On pixel tasks, where a
CPU cannot afford a search per frame, that is the difference between hours and days per 100k steps.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from loopwm.config import ConfigError, PlannerConfig
from loopwm.nets import argmax_groups, one_hot_groups

from .planner import LatentFn, Planner, register_planner


@register_planner("policy")
class PolicyPlanner(Planner):
    """Acts with the policy prior: a sample from π(a|z) in training; in evaluation its mode, or a sample with
    `planner.policy_eval: sample` (DreamerV3 evaluates so: on Atari without sticky actions a deterministic
    policy can lock into a loop its samples would leave).

    Samples come from the planner's own generator, so they travel with `state_dict` like a search's do.
    """

    def __init__(self, wm: Any, cfg: PlannerConfig, value: Optional[LatentFn] = None, prior: Any = None, **kw: Any):
        if prior is None:
            raise ConfigError("planner.method='policy' acts with the policy prior: set agent.use_policy_prior=true")
        super().__init__(wm, cfg, value, prior, **kw)

    @torch.no_grad()
    def plan(self, z: Tensor, *, eval_mode: bool = False, t0: bool | np.ndarray | Tensor = False) -> Tensor:
        """The actor's action for latents [Z] or [N, Z] -> [A] or [N, A] (one-hot for Discrete)."""
        single = z.dim() == 1
        z = z[None] if single else z
        if eval_mode and self.cfg.policy_eval == "mode":
            action = self.prior.mode(z)
        else:
            action = self.prior.sample(z, generator=self.gen)[0]
            if self.wm.discrete:  # the straight-through sample is one-hot only up to rounding
                action = one_hot_groups(argmax_groups(action, self.sampler.groups), self.sampler.groups)
        self.last_stats = {}
        return action[0] if single else action
