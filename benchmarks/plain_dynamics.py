"""A plain MLP world model of TD-MPC2's size, the planner-speed baseline: the same planner, no loop.

TD-MPC2 (Hansen et al., arXiv 2310.16828) at its 1M-parameter size plans with latent 128 and MLP width
384: dynamics d(z, a) = SimNorm(W₃ Mish(LN(W₂ Mish(LN(W₁[z; a]))))), reward R(z, a) the same layout with
101 two-hot bins in symlog space, and an encoder with one 256-wide LN+Mish layer. `PlainWorldModel`
gives `loopwm.agents.Planner` what a `WorldModel` gives it (latents, rewards, continues of one, zero
loops), so the planner runs on it unchanged. Its weights are untrained: a decision's cost does not depend
on them, since nothing in it adapts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loopwm.nets import symexp
from loopwm.world_model import ImagineOutput


class SimNorm(nn.Module):
    """Softmax over consecutive groups of `group` latent entries (TD-MPC2's simplicial normalisation)."""

    def __init__(self, group: int = 8):
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.group)).softmax(-1).flatten(-2)


def normed_mlp(in_dim: int, width: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """`layers` Linear-LayerNorm-Mish blocks of `width`, then a plain linear map (TD-MPC2's `mlp`)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else width, width), nn.LayerNorm(width), nn.Mish()]
    return nn.Sequential(*mods, nn.Linear(width, out_dim))


class PlainWorldModel(nn.Module):
    """Encoder, dynamics and reward of TD-MPC2's planning path for Box observations and actions."""

    discrete = False
    action_groups: tuple[int, ...] = ()

    def __init__(self, obs_dim: int, action_dim: int, latent: int = 128, width: int = 384, bins: int = 101):
        super().__init__()
        self.action_dim, self.latent_dim = action_dim, latent
        self.encoder = nn.Sequential(normed_mlp(obs_dim, 256, latent, layers=1), SimNorm())
        self.dynamics = nn.Sequential(normed_mlp(latent + action_dim, width, latent), SimNorm())
        self.reward = normed_mlp(latent + action_dim, width, bins)
        self.register_buffer("support", torch.linspace(-20.0, 20.0, bins), persistent=False)

    def encode(self, obs: Tensor) -> Tensor:
        """Observations [B, obs_dim] -> latents [B, latent]."""
        return self.encoder(torch.as_tensor(obs, dtype=torch.float32))

    def imagine(self, z: Tensor, actions: Tensor, decode: str = "none") -> ImagineOutput:
        """Roll `actions` [H, B, A] from z: r_k = R(z_k, a_k), z_{k+1} = d(z_k, a_k), as TD-MPC2 plans."""
        latents, rewards = [z], []
        for a in actions:
            za = torch.cat([z, a], -1)
            rewards.append(symexp((self.reward(za).softmax(-1) * self.support).sum(-1)))
            z = self.dynamics(za)
            latents.append(z)
        rewards_t = torch.stack(rewards)
        return ImagineOutput(
            latents=torch.stack(latents),
            rewards=rewards_t,
            continues=torch.ones_like(rewards_t),
            bound=torch.zeros_like(rewards_t),
            converged=torch.ones_like(rewards_t, dtype=torch.bool),
            loops=torch.zeros_like(rewards_t, dtype=torch.long),
        )
