"""A latent value function and a policy prior: they let the planner see past its horizon and seed its samples.

Both learn on world-model latents only. Shapes, with T the replay sequence length and B the batch:
    latents    [T+1, B, Z]  wm.encode of o_0..o_T, no gradient needed (they are detached here)
    rewards    [T, B]       r_t received after action a_t, i.e. on the transition o_t -> o_{t+1}
    continues  [T, B]       1 - terminated_{t+1}; a time-limit truncation is not a termination
    mask       [T, B]       optional, 0 where o_{t+1} does not follow o_t (an episode boundary inside the sequence)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopwm.config import AgentConfig
from loopwm.nets import group_slices, symexp, symlog

from .planner import LatentFn, discounted_return

_LOG_STD_MIN, _LOG_STD_MAX = -5.0, 1.0


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Two hidden layers with LayerNorm and SiLU (the TD-MPC2 layout)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, out_dim),
    )


def _step(optim: torch.optim.Optimizer, params: list[Tensor], grads: tuple[Tensor, ...], clip: float) -> float:
    """Apply precomputed gradients with norm clipping (none when clip <= 0); returns the pre-clip norm."""
    for p, g in zip(params, grads):
        p.grad = g
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    optim.step()
    optim.zero_grad(set_to_none=True)
    return float(norm)


def lambda_returns(
    rewards: Tensor, continues: Tensor, next_values: Tensor, discount: float, lam: float, mask: Optional[Tensor] = None
) -> Tensor:
    """λ-returns G_t = r_t + γ c_t ((1 − λ) V(z_{t+1}) + λ G_{t+1}) over [T, B] tensors, G_T = V(z_T).

    λ = 0 is TD(0); λ = 1 sums the sequence's rewards and bootstraps only at its end. Where mask_{t+1} is 0
    the next transition does not follow, so G_t bootstraps from V(z_{t+1}) alone.
    """
    returns = torch.empty_like(rewards)
    ahead = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        if t + 1 < rewards.shape[0]:
            follow = lam if mask is None else lam * mask[t + 1]
            ahead = (1 - follow) * next_values[t] + follow * returns[t + 1]
        returns[t] = rewards[t] + discount * continues[t] * ahead
    return returns


@dataclass
class ImaginedRollout:
    """The actor's imagined rollout, without gradients: latents [H+1, B, Z], one-hot actions [H, B, A],
    λ-returns [H, B], values [H+1, B] and reach [H, B] = γ^k Π_{j<k} c_j, the chance that step k is reached."""

    states: Tensor
    actions: Tensor
    returns: Tensor
    values: Tensor
    reach: Tensor

    def advantage(self) -> Tensor:
        """(G^λ_k − V(z_k)) weighted by reach, [H, B]."""
        return self.reach * (self.returns - self.values[:-1])


class ValueFunction:
    """V(z): an MLP on latents fitted to λ-returns of replay sequences, bootstrapped from a Polyak target copy.

    The network predicts symlog(V), as DreamerV3 and TD-MPC2 do for their values: returns of a few hundred
    are then a few units away from the zero start, where Adam's bounded steps reach them in tens of
    updates rather than thousands.
    """

    def __init__(
        self, latent_dim: int, cfg: AgentConfig, *, grad_clip: float = 10.0, device: torch.device | str = "cpu"
    ):
        self.cfg, self.grad_clip = cfg, grad_clip
        self.net = _mlp(latent_dim, cfg.hidden_dim, 1).to(device)
        nn.init.zeros_(self.net[-1].weight)  # V starts at exactly zero: no spurious optimism before any data
        nn.init.zeros_(self.net[-1].bias)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.optim = torch.optim.Adam(self.net.parameters(), lr=cfg.value_lr)

    def __call__(self, z: Tensor) -> Tensor:
        """V(z) for latents [..., Z] -> [...]; differentiable in z."""
        return symexp(self.net(z).squeeze(-1))

    @torch.no_grad()
    def target_value(self, z: Tensor) -> Tensor:
        """V_target(z): the slow copy, for bootstrapped targets."""
        return symexp(self.target(z).squeeze(-1))

    def update(
        self,
        latents: Tensor,
        rewards: Tensor,
        continues: Tensor,
        mask: Optional[Tensor] = None,
        imagined: Optional[Tensor] = None,
    ) -> dict[str, float]:
        """One regression step towards λ-returns of a replay batch (shapes in the module docstring), then a
        Polyak target update. Errors are measured in symlog units.

        `imagined` [T, B], if given, adds a second regression target for V(z_t): the policy prior's imagined
        return from z_t (Dreamer-style), which evaluates the improving policy rather than the data's.
        """
        latents = latents.detach()
        target = lambda_returns(
            rewards, continues, self.target_value(latents[1:]), self.cfg.discount, self.cfg.value_lambda, mask
        )
        pred = self.net(latents[:-1]).squeeze(-1)
        err = (pred - symlog(target)) ** 2
        if imagined is not None:
            err = err + (pred - symlog(imagined.detach())) ** 2
        loss = err.mean() if mask is None else (err * mask).sum() / mask.sum().clamp_min(1.0)
        params = list(self.net.parameters())
        norm = _step(self.optim, params, torch.autograd.grad(loss, params), self.grad_clip)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target.parameters()), params, self.cfg.tau)
        return {"value_loss": loss.item(), "value_mean": symexp(pred).mean().item(), "value_grad_norm": norm}

    def state_dict(self) -> dict[str, Any]:
        """Network, target network and optimiser state."""
        return {"net": self.net.state_dict(), "target": self.target.state_dict(), "optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.optim.load_state_dict(state["optim"])


class PolicyPrior:
    """A stochastic actor π(a|z): tanh-Gaussian for Box (actions in [-1, 1]), one categorical per action group for
    Discrete, MultiDiscrete and MultiBinary (concatenated one-hots).

    Trained on the imagined return of its own rollouts, plus an entropy bonus, in one of two ways
    (`agent.prior_gradient`):
    - "dynamics": backpropagate Σ γ^k Πc r_k + γ^H Πc V(z_H) through the world model;
    - "reinforce": roll out without gradients and weight log π(a_k|z_k) by the advantage G^λ_k − V(z_k),
      with G^λ the λ-returns of the rollout. Categorical actions default to it: a straight-through one-hot
      sample gives a biased gradient, and through a model of sparse rewards an almost vanishing one.
    Returns are divided by a running scale, max(1, EMA of the 5-95 percentile range), so the entropy
    coefficient means the same for any reward scale. Only the actor's parameters are updated.
    """

    def __init__(
        self,
        latent_dim: int,
        action_dim: int,
        discrete: bool,
        cfg: AgentConfig,
        *,
        groups: Optional[tuple[int, ...]] = None,
        lr: Optional[float] = None,
        grad_clip: float = 10.0,
        scale_decay: float = 0.99,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.discrete, self.action_dim = cfg, discrete, action_dim
        self.slices = group_slices(tuple(groups) if groups else (action_dim,))
        if discrete and self.slices[-1].stop != action_dim:
            raise ValueError(f"action groups {groups} do not add up to action_dim={action_dim}")
        self.horizon, self.entropy_coef = cfg.prior_horizon, cfg.prior_entropy
        self.gradient = prior_gradient(cfg.prior_gradient, discrete)
        self.grad_clip, self.scale_decay = grad_clip, scale_decay
        self.net = _mlp(latent_dim, cfg.hidden_dim, action_dim if discrete else 2 * action_dim).to(device)
        self.optim = torch.optim.Adam(self.net.parameters(), lr=lr if lr is not None else cfg.value_lr)
        self.scale = torch.ones((), device=device)

    def sample(self, z: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """A reparameterised action [B, A] and its entropy estimate [B] (−log π(a|z) for Box, exact for Discrete),
        drawn with `generator` (torch's global one when None)."""
        out = self.net(z)
        if self.discrete:  # a straight-through one-hot sample and the exact entropy, per group
            actions, entropy = [], 0.0
            for logits in self._group_log_probs(out):
                probs = logits.exp()
                idx = torch.multinomial(probs.detach(), 1, generator=generator)[:, 0]
                actions.append(F.one_hot(idx, logits.shape[-1]).to(probs.dtype) + probs - probs.detach())
                entropy = entropy - (probs * logits).sum(-1)
            return torch.cat(actions, -1), entropy
        action, eps, log_std = self._box_sample(out, generator)
        log_prob = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - torch.log((1 - action**2).clamp_min(1e-6)).sum(-1)
        return action, -log_prob

    def _group_log_probs(self, out: Tensor) -> list[Tensor]:
        """Log-probabilities of each categorical group, from the network's output."""
        return [out[..., sl].log_softmax(-1) for sl in self.slices]

    def log_prob(self, z: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """log π(a|z) and the exact entropy of π(·|z), both [...], for one-hot categorical actions [..., A]."""
        log_prob, entropy = 0.0, 0.0
        for logits, sl in zip(self._group_log_probs(self.net(z)), self.slices):
            log_prob = log_prob + (logits * actions[..., sl]).sum(-1)
            entropy = entropy - (logits.exp() * logits).sum(-1)
        return log_prob, entropy

    def _box_sample(self, out: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        """A tanh-Gaussian action from the network's output, with the noise and log-std that drew it."""
        mu, log_std = out.chunk(2, -1)
        log_std = _LOG_STD_MIN + 0.5 * (_LOG_STD_MAX - _LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return torch.tanh(mu + log_std.exp() * eps), eps, log_std

    @torch.no_grad()
    def __call__(self, z: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A sampled action [B, A] (what the planner seeds its samples with; its log-probability is not needed),
        drawn with `generator` (the planner passes its own, so a seeded planner repeats its actions)."""
        return self.sample(z, generator)[0] if self.discrete else self._box_sample(self.net(z), generator)[0]

    @torch.no_grad()
    def mode(self, z: Tensor) -> Tensor:
        """The most likely action [B, A]: tanh(μ) for Box, the argmax one-hot for Discrete."""
        out = self.net(z)
        if self.discrete:
            return torch.cat([F.one_hot(out[..., sl].argmax(-1), sl.stop - sl.start) for sl in self.slices], -1).to(
                out.dtype
            )
        return torch.tanh(out.chunk(2, -1)[0])

    def imagined_return(self, wm: Any, z: Tensor, value: Optional[LatentFn] = None) -> tuple[Tensor, Tensor]:
        """Roll the actor `horizon` steps through `wm` from latents [B, Z]; returns (G [B], mean entropy [B])."""
        rewards, continues, entropy = [], [], []
        for _ in range(self.horizon):
            action, ent = self.sample(z)
            out = wm.imagine(z, action[None], decode="none")
            z = out.latents[-1]
            rewards.append(out.rewards[0])
            continues.append(out.continues[0])
            entropy.append(ent)
        terminal = value(z) if value is not None else None
        ret = discounted_return(torch.stack(rewards), torch.stack(continues), self.cfg.discount, terminal)
        return ret, torch.stack(entropy).mean(0)

    @torch.no_grad()
    def rollout(self, wm: Any, z: Tensor, value: Optional[LatentFn] = None) -> ImaginedRollout:
        """Roll the actor `horizon` steps through `wm` from latents [B, Z] without gradients, and score every
        step with its λ-return bootstrapped from `value`. Without a value there is nothing to bootstrap from
        on the way, so the return is the plain discounted sum of the rewards (λ = 1)."""
        states, actions, rewards, continues = [z], [], [], []
        for _ in range(self.horizon):
            action = self.sample(z)[0].round()  # exact one-hots: the straight-through sum is off by an ulp
            out = wm.imagine(z, action[None], decode="none")
            z = out.latents[-1]
            states.append(z)
            actions.append(action)
            rewards.append(out.rewards[0])
            continues.append(out.continues[0])
        states, rewards, continues = torch.stack(states), torch.stack(rewards), torch.stack(continues)
        values = value(states) if value is not None else torch.zeros_like(states[..., 0])
        lam = self.cfg.value_lambda if value is not None else 1.0
        returns = lambda_returns(rewards, continues, values[1:], self.cfg.discount, lam)
        reach = torch.cat([torch.ones_like(continues[:1]), (self.cfg.discount * continues[:-1]).cumprod(0)])
        return ImaginedRollout(states, torch.stack(actions), returns, values, reach)

    def update(
        self,
        wm: Any,
        latents: Tensor,
        value: Optional[LatentFn] = None,
        rollout: Optional[ImaginedRollout] = None,
    ) -> dict[str, float]:
        """One actor step from start latents [..., Z] (e.g. all replay latents flattened). With the "dynamics"
        gradient `wm.imagine` must be differentiable in z and actions; with "reinforce", `rollout` may be
        one `rollout` already made from these latents (the agent also fits its value to it), and is then what
        the step learns from. Neither `wm` nor `value` receives gradients."""
        starts = latents.detach().reshape(-1, latents.shape[-1])
        if self.gradient == "reinforce":
            if rollout is not None and rollout.states.shape[1] != starts.shape[0]:
                raise ValueError(f"rollout has {rollout.states.shape[1]} starts; latents give {starts.shape[0]}")
            rollout = rollout if rollout is not None else self.rollout(wm, starts, value)
            ret = rollout.returns[0]
            self._rescale(rollout.returns)
            log_prob, entropy = self.log_prob(rollout.states[:-1], rollout.actions)
            entropy = rollout.reach * entropy
            # its gradient is E[∇ log π(a_k|z_k) · advantage_k], each step weighted by the chance it is reached
            objective = log_prob * rollout.advantage() / self.scale.clamp_min(1.0)
        else:
            ret, entropy = self.imagined_return(wm, starts, value)
            self._rescale(ret)
            objective = ret / self.scale.clamp_min(1.0)
        loss = -objective.mean() - self.entropy_coef * entropy.mean()
        params = list(self.net.parameters())
        norm = _step(self.optim, params, torch.autograd.grad(loss, params), self.grad_clip)
        return {
            "prior_loss": loss.item(),
            "prior_return": ret.mean().item(),
            "prior_entropy": entropy.mean().item(),
            "prior_grad_norm": norm,
        }

    @torch.no_grad()
    def _rescale(self, returns: Tensor) -> None:
        """Move the running return scale towards the 5-95 percentile range of `returns`."""
        flat = returns.detach().flatten()
        lo, hi = torch.quantile(flat, torch.tensor([0.05, 0.95], device=flat.device, dtype=flat.dtype))
        self.scale.lerp_((hi - lo).to(self.scale.dtype), 1 - self.scale_decay)

    def state_dict(self) -> dict[str, Any]:
        """Network, optimiser state and the running return scale."""
        return {"net": self.net.state_dict(), "optim": self.optim.state_dict(), "scale": self.scale.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.net.load_state_dict(state["net"])
        self.optim.load_state_dict(state["optim"])
        self.scale.copy_(state["scale"])


def prior_gradient(name: str, discrete: bool) -> str:
    """Resolve `agent.prior_gradient` for an action space: "auto" is reinforce for categorical actions and
    dynamics for Box ones; reinforce with Box actions is refused."""
    if name == "auto":
        return "reinforce" if discrete else "dynamics"
    if name == "reinforce" and not discrete:
        raise ValueError(
            "agent.prior_gradient='reinforce' needs categorical actions (Discrete, MultiDiscrete, MultiBinary); "
            "Box actions use 'dynamics' (or 'auto')"
        )
    return name  # any other name is refused when the config is built
