"""The reference model-based RL users know: a plain MLP in observation space (PETS/MBPO style, one member).

Inputs are the observation normalised by the train split's statistics and the action in the model's units
([−1, 1] for a Box); the output is the observation delta normalised by its own train statistics, fitted with a
1-step squared loss; rollouts add the de-normalised delta to the previous (predicted) observation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from loopwm.replay import ReplayBuffer


def _delta_stats(data: ReplayBuffer) -> tuple[Tensor, Tensor]:
    """Mean and std of o_{k+1} − o_k over every stored transition."""
    deltas = np.concatenate([np.diff(ep["obs"].astype(np.float64), axis=0) for ep in data.episodes()])
    return torch.tensor(deltas.mean(0), dtype=torch.float32), torch.tensor(deltas.std(0), dtype=torch.float32)


class ObsMLP(nn.Module):
    """o_{k+1} = o_k + σ_Δ ⊙ f([(o_k − μ)/σ; a_k]) + μ_Δ, with f a `layers`×`width` SiLU MLP."""

    def __init__(self, obs_dim: int, action_dim: int, width: int, layers: int):
        super().__init__()
        dims = [obs_dim + action_dim] + [width] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*mods, nn.Linear(width, obs_dim))
        for name in ("obs_mean", "obs_std", "delta_mean", "delta_std"):
            self.register_buffer(name, torch.zeros(obs_dim) if "mean" in name else torch.ones(obs_dim))

    @classmethod
    def from_data(cls, data: ReplayBuffer, width: int, layers: int) -> "ObsMLP":
        """A model sized for `data`'s spaces, with its normalisers taken from `data`."""
        model = cls(data.obs_shape[0], data.action_dim, width, layers)
        stats = data.stats()
        d_mean, d_std = _delta_stats(data)
        model.obs_mean.copy_(stats["obs_mean"])
        model.obs_std.copy_(stats["obs_std"].clamp_min(1e-3))
        model.delta_mean.copy_(d_mean)
        model.delta_std.copy_(d_std.clamp_min(1e-6))
        return model

    def normalised_delta(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([(obs - self.obs_mean) / self.obs_std, action], -1))

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        """The predicted next observation."""
        return obs + self.normalised_delta(obs, action) * self.delta_std + self.delta_mean

    def rollout(self, obs0: Tensor, actions: Tensor) -> Tensor:
        """Open loop from obs0 [B, D] through actions [H, B, A]: predictions [H, B, D]."""
        preds, obs = [], obs0
        for a in actions:
            obs = self(obs, a)
            preds.append(obs)
        return torch.stack(preds)

    def macs(self) -> int:
        """Multiply-adds of one prediction (the linear maps)."""
        return sum(m.weight.numel() for m in self.net if isinstance(m, nn.Linear))


def fit_obs_mlp(
    model: ObsMLP, data: ReplayBuffer, batch: int, rng: np.random.Generator, lr: float = 1e-3
) -> Callable[[], float]:
    """A function doing one Adam step of the 1-step loss on a fresh batch of transitions; returns the loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> float:
        b = data.sample(batch, 1, rng)
        obs, nxt, action = b["obs"][0].float(), b["obs"][1].float(), b["actions"][0].float()
        target = (nxt - obs - model.delta_mean) / model.delta_std
        loss = (model.normalised_delta(obs, action) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step
