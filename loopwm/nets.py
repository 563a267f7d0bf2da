"""Encoders, decoders and heads that sit outside the loop, plus the space description they are built from.

The core never imports gymnasium: spaces are described by a plain `SpaceSpec`, built from any object
with Box/Discrete-like attributes, so checkpoints load without the environment.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SpaceSpec:
    """Observation and action spaces as plain data: what the model needs to know about an env."""

    obs_shape: tuple[int, ...]
    obs_dtype: str
    discrete: bool
    action_dim: int
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()

    @staticmethod
    def from_spaces(obs_space: Any, act_space: Any) -> "SpaceSpec":
        """Describe Box/Discrete spaces; anything else gets an error naming the space."""
        shape = getattr(obs_space, "shape", None)
        if not shape or getattr(obs_space, "dtype", None) is None or len(shape) not in (1, 3):
            raise TypeError(
                f"unsupported observation space {obs_space!r}: expected a Box of shape (d,) or (C, H, W)")
        if hasattr(act_space, "n") and getattr(act_space, "shape", None) == ():
            return SpaceSpec(tuple(shape), str(np.dtype(obs_space.dtype)), True, int(act_space.n))
        a_shape = getattr(act_space, "shape", None)
        if a_shape is None or len(a_shape) != 1 or not hasattr(act_space, "low"):
            raise TypeError(f"unsupported action space {act_space!r}: expected Discrete or a 1-D Box")
        low, high = np.asarray(act_space.low, np.float64), np.asarray(act_space.high, np.float64)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise TypeError(f"unsupported action space {act_space!r}: Box bounds must be finite")
        return SpaceSpec(tuple(shape), str(np.dtype(obs_space.dtype)), False, int(a_shape[0]),
                         tuple(low.tolist()), tuple(high.tolist()))

    @property
    def pixels(self) -> bool:
        return len(self.obs_shape) == 3

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "SpaceSpec":
        return SpaceSpec(tuple(d["obs_shape"]), d["obs_dtype"], bool(d["discrete"]), int(d["action_dim"]),
                         tuple(d["action_low"]), tuple(d["action_high"]))


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear-LayerNorm-SiLU stacks (TD-MPC2 layout; SiLU costs ~9x less than Mish here, see benchmarks/activations.py), ending in a plain linear layer."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.SiLU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class VectorEncoder(nn.Module):
    """MLP encoder for normalised vector observations."""

    def __init__(self, obs_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PixelEncoder(nn.Module):
    """Strided conv encoder for (C, H, W) frames scaled to [-0.5, 0.5]."""

    def __init__(self, shape: tuple[int, ...], hidden: int, out_dim: int, channels: int = 32):
        super().__init__()
        c = shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels, 4, stride=2), nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2), nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 4, stride=2), nn.SiLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.conv(torch.zeros(1, *shape)).shape[-1]
        self.head = mlp(n, hidden, out_dim, layers=1)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = self.head(self.conv(x.reshape(-1, *x.shape[-3:])))
        return y.reshape(*lead, -1)


class PixelDecoder(nn.Module):
    """Transposed-conv decoder back to (C, H, W) frames in [-0.5, 0.5] units."""

    def __init__(self, shape: tuple[int, ...], latent: int, channels: int = 32):
        super().__init__()
        self.shape = shape
        self.base = max(shape[-1] // 8, 1)
        self.fc = nn.Linear(latent, 2 * channels * self.base * self.base)
        self.deconv = nn.Sequential(
            nn.SiLU(), nn.ConvTranspose2d(2 * channels, 2 * channels, 4, stride=2, padding=1),
            nn.SiLU(), nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(), nn.ConvTranspose2d(channels, shape[0], 4, stride=2, padding=1),
        )
        self.channels = channels

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.fc(z.reshape(-1, z.shape[-1])).view(-1, 2 * self.channels, self.base, self.base)
        x = F.interpolate(self.deconv(x), size=self.shape[-2:], mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.shape)


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


class RewardHead(nn.Module):
    """Reward in symlog space: a scalar regression ("symlog") or a two-hot distribution ("twohot", DreamerV3)."""

    def __init__(self, latent: int, hidden: int, kind: str, bins: int, limit: float = 20.0):
        super().__init__()
        self.kind = kind
        self.net = mlp(latent, hidden, bins if kind == "twohot" else 1)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("support", torch.linspace(-limit, limit, bins), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        """Predicted reward in the environment's units."""
        out = self.net(z)
        if self.kind == "twohot":
            return symexp((out.softmax(-1) * self.support).sum(-1))
        return symexp(out.squeeze(-1))

    def loss(self, z: Tensor, reward: Tensor) -> Tensor:
        """Per-element loss against true rewards (shape of `reward`)."""
        out = self.net(z)
        target = symlog(reward)
        if self.kind == "symlog":
            return (out.squeeze(-1) - target).pow(2)
        return -(two_hot(target, self.support) * out.log_softmax(-1)).sum(-1)


def two_hot(x: Tensor, support: Tensor) -> Tensor:
    """Encode scalars as weights on the two nearest support points."""
    x = x.clamp(support[0], support[-1])
    idx = torch.searchsorted(support, x.contiguous()).clamp(1, len(support) - 1)
    lo, hi = support[idx - 1], support[idx]
    w_hi = (x - lo) / (hi - lo)
    out = torch.zeros(*x.shape, len(support), device=x.device, dtype=x.dtype)
    out.scatter_(-1, (idx - 1).unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, idx.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Scale each vector to RMS 1, so ‖x‖ = √dim: this is what bounds the loop's injection."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def build_encoder(spec: SpaceSpec, kind: str, hidden: int, out_dim: int) -> nn.Module:
    """The observation encoder for `spec`: an MLP for vectors, a CNN for frames."""
    if kind == "auto":
        kind = "cnn" if spec.pixels else "mlp"
    if kind == "cnn" and not spec.pixels:
        raise ValueError(f"model.encoder='cnn' needs (C, H, W) observations, got shape {spec.obs_shape}")
    if kind == "mlp" and spec.pixels:
        raise ValueError(f"model.encoder='mlp' needs vector observations, got shape {spec.obs_shape}")
    if kind == "cnn":
        return PixelEncoder(spec.obs_shape, hidden, out_dim)
    return VectorEncoder(spec.obs_shape[0], hidden, out_dim)


def build_decoder(spec: SpaceSpec, latent: int, hidden: int) -> nn.Module:
    """Observation decoder (into normalised observation units)."""
    if spec.pixels:
        return PixelDecoder(spec.obs_shape, latent)
    return mlp(latent, hidden, spec.obs_shape[0])


def optional(x: Optional[Tensor], like: Tensor, dim: int) -> Tensor:
    """`x`, or zeros of width `dim` shaped like `like`'s batch when absent."""
    return x if x is not None else like.new_zeros(*like.shape[:-1], dim)
