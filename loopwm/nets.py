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
    """Observation and action spaces as plain data: what the model needs to know about an env.

    Observations are a Box of shape (d,) or (C, H, W), or a Dict of such Boxes: a Dict arrives
    flattened into one float32 vector (keys in sorted order, `obs_parts` naming each key's shape and
    whether it holds frames), so the replay and the loop see one vector and the encoder splits it.
    Actions are a 1-D Box (normalised to [−1, 1]) or categorical: Discrete, MultiDiscrete or
    MultiBinary, as one-hot groups of sizes `action_groups` concatenated into `action_dim` entries, each group's
    smallest value in `action_starts` (Discrete and MultiDiscrete may start above or below 0; () means all 0).
    """

    obs_shape: tuple[int, ...]
    obs_dtype: str
    discrete: bool
    action_dim: int
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    action_groups: tuple[int, ...] = ()
    obs_parts: tuple[tuple[str, tuple[int, ...], bool], ...] = ()
    action_starts: tuple[int, ...] = ()

    @staticmethod
    def from_spaces(obs_space: Any, act_space: Any) -> "SpaceSpec":
        """Describe the spaces; anything unsupported gets an error naming the space and what is supported."""
        obs_shape, obs_dtype, parts = _observation_layout(obs_space)
        groups = _action_groups(act_space)
        if groups:
            starts = (
                tuple(int(x) for x in np.ravel(getattr(act_space, "start", 0))) if hasattr(act_space, "start") else ()
            )
            return SpaceSpec(
                obs_shape,
                obs_dtype,
                True,
                sum(groups),
                action_groups=groups,
                obs_parts=parts,
                action_starts=starts if any(starts) else (),
            )
        low, high = np.asarray(act_space.low, np.float64), np.asarray(act_space.high, np.float64)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise TypeError(f"unsupported action space {act_space!r}: a Box needs finite bounds to be normalised")
        return SpaceSpec(
            obs_shape,
            obs_dtype,
            False,
            int(act_space.shape[0]),
            tuple(low.tolist()),
            tuple(high.tolist()),
            obs_parts=parts,
        )

    @property
    def pixels(self) -> bool:
        return len(self.obs_shape) == 3

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "SpaceSpec":
        return SpaceSpec(
            tuple(d["obs_shape"]),
            d["obs_dtype"],
            bool(d["discrete"]),
            int(d["action_dim"]),
            tuple(d["action_low"]),
            tuple(d["action_high"]),
            tuple(d["action_groups"]),
            tuple((str(k), tuple(shape), bool(frames)) for k, shape, frames in d["obs_parts"]),
            tuple(int(x) for x in d.get("action_starts", ())),  # absent from checkpoints that predate it: all 0
        )


SUPPORTED_OBS = "a Box of shape (d,) or (C, H, W), or a Dict of such Boxes"
SUPPORTED_ACTIONS = "a 1-D Box with finite bounds, Discrete, MultiDiscrete or MultiBinary"


def _box_layout(space: Any, where: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(space, "shape", None)
    if not hasattr(space, "low") or not shape or getattr(space, "dtype", None) is None or len(shape) not in (1, 3):
        raise TypeError(f"unsupported observation space {where}{space!r}: expected {SUPPORTED_OBS}")
    return tuple(int(n) for n in shape), str(np.dtype(space.dtype))


def _observation_layout(space: Any) -> tuple[tuple[int, ...], str, tuple]:
    """(obs_shape, obs_dtype, obs_parts) of a Box, or of a Dict flattened into one float32 vector (given as
    the Dict itself or as the flattened Box that keeps it in `dict_space`)."""
    space = getattr(space, "dict_space", space)
    subspaces = getattr(space, "spaces", None)
    if isinstance(subspaces, dict):
        if not subspaces:
            raise TypeError(f"unsupported observation space {space!r}: the Dict has no keys")
        parts = []
        for key in sorted(subspaces):
            if isinstance(getattr(subspaces[key], "spaces", None), (dict, tuple)):
                raise TypeError(
                    f"unsupported observation space {space!r}: key {key!r} is nested; expected {SUPPORTED_OBS}"
                )
            shape, _ = _box_layout(subspaces[key], f"key {key!r} of ")
            parts.append((str(key), shape, len(shape) == 3))
        return (sum(int(np.prod(shape)) for _, shape, _ in parts),), "float32", tuple(parts)
    shape, dtype = _box_layout(space, "")
    return shape, dtype, ()


def _action_groups(space: Any) -> tuple[int, ...]:
    """One-hot group sizes of a categorical action space; () for a 1-D Box; an error for anything else."""
    nvec = getattr(space, "nvec", None)
    if nvec is not None:  # MultiDiscrete
        nvec = np.asarray(nvec)
        if nvec.ndim != 1 or np.any(nvec < 1):
            raise TypeError(
                f"unsupported action space {space!r}: expected a 1-D MultiDiscrete; supported: {SUPPORTED_ACTIONS}"
            )
        return tuple(int(n) for n in nvec)
    shape = getattr(space, "shape", None)
    if hasattr(space, "n") and shape == ():  # Discrete
        return (int(space.n),)
    if hasattr(space, "n") and not hasattr(space, "low") and shape is not None and len(shape) == 1:  # MultiBinary
        return (2,) * int(shape[0])
    if shape is None or len(shape) != 1 or not hasattr(space, "low"):
        raise TypeError(f"unsupported action space {space!r}: expected {SUPPORTED_ACTIONS}")
    return ()


def group_slices(groups: tuple[int, ...]) -> list[slice]:
    """Where each one-hot group sits in a categorical action vector."""
    ends = np.cumsum(groups).tolist()
    return [slice(end - n, end) for n, end in zip(groups, ends)]


def one_hot_groups(indices: Tensor, groups: tuple[int, ...]) -> Tensor:
    """Indices [..., G], one per group, -> concatenated one-hots [..., Σ groups]."""
    return torch.cat([F.one_hot(indices[..., i].long(), n) for i, n in enumerate(groups)], -1).float()


def argmax_groups(x: Tensor, groups: tuple[int, ...]) -> Tensor:
    """Concatenated scores [..., Σ groups] -> the best index of each group [..., G]."""
    return torch.stack([x[..., sl].argmax(-1) for sl in group_slices(groups)], -1)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear-LayerNorm-SiLU stacks (TD-MPC2 layout; SiLU costs ~9x less than Mish here, see
    benchmarks/activations.py), ending in a plain linear layer."""
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


CONV_STACK = ((8, 4), (4, 2), (3, 1))
"""(kernel, stride) of the pixel encoder's convolutions, the DQN stack of Mnih et al. (2015): a stride-4 stem
makes it cheap enough to train on a CPU (2.7M multiply-adds per 84x84x4 frame stack at 16 channels)."""


def conv_sizes(size: int) -> list[int]:
    """Spatial size after each of the encoder's convolutions, starting from the input's."""
    sizes = [size]
    for kernel, stride in CONV_STACK:
        sizes.append((sizes[-1] - kernel) // stride + 1)
    return sizes


class PixelEncoder(nn.Module):
    """Convolutional encoder for (C, H, W) frames scaled to [-0.5, 0.5]: channels c, 2c, 2c, then a linear map."""

    MIN_SIZE = 36  # the smallest frame the three convolutions leave a pixel of

    def __init__(self, shape: tuple[int, ...], hidden: int, out_dim: int, channels: int = 16):
        super().__init__()
        if min(shape[-2:]) < self.MIN_SIZE:
            raise ValueError(
                f"frames of shape {tuple(shape)} are too small for the CNN encoder: "
                f"it needs at least {self.MIN_SIZE}x{self.MIN_SIZE} pixels"
            )
        widths = (shape[0], channels, 2 * channels, 2 * channels)
        layers: list[nn.Module] = []
        for (kernel, stride), c_in, c_out in zip(CONV_STACK, widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel, stride=stride), nn.SiLU()]
        self.conv = nn.Sequential(*layers, nn.Flatten())
        h, w = conv_sizes(shape[-2])[-1], conv_sizes(shape[-1])[-1]
        self.head = mlp(widths[-1] * h * w, hidden, out_dim, layers=1)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = self.head(self.conv(x.reshape(-1, *x.shape[-3:])))
        return y.reshape(*lead, -1)


class PixelDecoder(nn.Module):
    """The encoder mirrored: a linear map to its last feature map, then transposed convolutions whose output
    padding lands exactly on the frame size, back to (C, H, W) frames in [-0.5, 0.5] units."""

    def __init__(self, shape: tuple[int, ...], latent: int, channels: int = 16):
        super().__init__()
        self.shape = tuple(shape)
        hs, ws = conv_sizes(shape[-2]), conv_sizes(shape[-1])
        self.base = (2 * channels, hs[-1], ws[-1])
        self.fc = nn.Linear(latent, int(np.prod(self.base)))
        widths = (2 * channels, 2 * channels, channels, shape[0])
        layers: list[nn.Module] = []
        for i, (kernel, stride) in enumerate(reversed(CONV_STACK)):
            j = len(CONV_STACK) - 1 - i  # the encoder layer this one inverts: sizes[j + 1] -> sizes[j]
            pad = tuple(sizes[j] - ((sizes[j + 1] - 1) * stride + kernel) for sizes in (hs, ws))
            layers += [nn.SiLU(), nn.ConvTranspose2d(widths[i], widths[i + 1], kernel, stride, output_padding=pad)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.deconv(self.fc(z.reshape(-1, z.shape[-1])).view(-1, *self.base))
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


class DictEncoder(nn.Module):
    """One encoder per key of a flattened Dict observation (a CNN for frames, an MLP for vectors), fused by an MLP."""

    def __init__(self, parts: tuple, hidden: int, out_dim: int, channels: int = 16):
        super().__init__()
        self.shapes = [shape for _, shape, _ in parts]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.parts = nn.ModuleList(
            PixelEncoder(shape, hidden, hidden, channels) if frames else mlp(shape[0], hidden, hidden)
            for _, shape, frames in parts
        )
        self.fuse = mlp(hidden * len(parts), hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.split(self.sizes, dim=-1)
        feats = [enc(c.reshape(*c.shape[:-1], *shape)) for enc, c, shape in zip(self.parts, chunks, self.shapes)]
        return self.fuse(torch.cat(feats, -1))


class DictDecoder(nn.Module):
    """One decoder per key, their outputs flattened back into the Dict observation's vector layout."""

    def __init__(self, parts: tuple, latent: int, hidden: int, channels: int = 16):
        super().__init__()
        self.parts = nn.ModuleList(
            PixelDecoder(shape, latent, channels) if frames else mlp(latent, hidden, shape[0])
            for _, shape, frames in parts
        )

    def forward(self, z: Tensor) -> Tensor:
        return torch.cat([dec(z).reshape(*z.shape[:-1], -1) for dec in self.parts], -1)


def build_encoder(spec: SpaceSpec, kind: str, hidden: int, out_dim: int, channels: int = 16) -> nn.Module:
    """The observation encoder for `spec`: an MLP for vectors, a CNN for frames, one per key for a Dict."""
    if spec.obs_parts:
        if kind not in ("auto", "mlp"):
            raise ValueError(f"model.encoder={kind!r}: Dict observations get one encoder per key; use 'auto'")
        return DictEncoder(spec.obs_parts, hidden, out_dim, channels)
    if kind == "auto":
        kind = "cnn" if spec.pixels else "mlp"
    if kind == "cnn" and not spec.pixels:
        raise ValueError(f"model.encoder='cnn' needs (C, H, W) observations, got shape {spec.obs_shape}")
    if kind == "mlp" and spec.pixels:
        raise ValueError(f"model.encoder='mlp' needs vector observations, got shape {spec.obs_shape}")
    if kind == "cnn":
        return PixelEncoder(spec.obs_shape, hidden, out_dim, channels)
    return VectorEncoder(spec.obs_shape[0], hidden, out_dim)


def build_decoder(spec: SpaceSpec, latent: int, hidden: int, channels: int = 16) -> nn.Module:
    """Observation decoder (into normalised observation units)."""
    if spec.obs_parts:
        return DictDecoder(spec.obs_parts, latent, hidden, channels)
    if spec.pixels:
        return PixelDecoder(spec.obs_shape, latent, channels)
    return mlp(latent, hidden, spec.obs_shape[0])


def build_delta_decoder(spec: SpaceSpec, latent: int, hidden: int) -> nn.Module:
    """Head from a latent transition [z_{k−1}; z_k] to the normalised observation change, for vector observations.

    Its last layer starts at zero, so an untrained model predicts "no change" rather than noise.
    """
    if spec.pixels or any(frames for _, _, frames in spec.obs_parts):
        raise ValueError(f"model.obs_decoder='delta' needs vector observations, got shape {spec.obs_shape}")
    head = mlp(2 * latent, hidden, spec.obs_shape[0])
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def frame_mask(spec: SpaceSpec) -> Tensor:
    """Which entries of a flattened Dict observation are frame pixels (normalised by a fixed 0..255 scale)."""
    if not spec.obs_parts:
        return torch.zeros(spec.obs_shape[0] if not spec.pixels else 1, dtype=torch.bool)
    return torch.cat([torch.full((int(np.prod(shape)),), frames) for _, shape, frames in spec.obs_parts])


def optional(x: Optional[Tensor], like: Tensor, dim: int) -> Tensor:
    """`x`, or zeros of width `dim` shaped like `like`'s batch when absent."""
    return x if x is not None else like.new_zeros(*like.shape[:-1], dim)
