"""What the model environments share: their spaces, checks on actions, observation formatting, and one
batched model step that reads out everything an environment step returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from gymnasium.spaces import Box, Discrete, MultiBinary, MultiDiscrete, Space
from torch import Tensor

from loopwm.envs.factory import action_groups, action_starts, action_to_model
from loopwm.exits import LoopOptions
from loopwm.nets import SpaceSpec
from loopwm.world_model import WorldModel

CATEGORICAL = (Discrete, MultiDiscrete, MultiBinary)


def _describe_actions(spec: SpaceSpec) -> str:
    if not spec.discrete:
        return f"Box({list(spec.action_low)}, {list(spec.action_high)}, ({spec.action_dim},))"
    starts = f" starting at {list(spec.action_starts)}" if spec.action_starts else ""
    return f"categorical actions with one-hot groups {list(spec.action_groups)}{starts}"


def check_compatible(spec: SpaceSpec, obs_space: Optional[Space], act_space: Optional[Space], where: str) -> None:
    """Raise a ValueError naming the difference when `where`'s spaces are not those the model was built for.

    Observations must be a Box of the model's shape and dtype (a Dict arrives flattened by `make_env`); a float
    Box of another width (MuJoCo's float64) counts as the model's float32, since `make_env` casts it the same way.
    Actions must be categorical with the same groups, or a Box with the same bounds.
    """
    if obs_space is not None:
        shape, dtype = tuple(getattr(obs_space, "shape", None) or ()), getattr(obs_space, "dtype", None)
        dtype_ok = dtype is not None and (
            np.dtype(dtype) == np.dtype(spec.obs_dtype)
            or (np.issubdtype(dtype, np.floating) and np.issubdtype(np.dtype(spec.obs_dtype), np.floating))
        )
        if not isinstance(obs_space, Box) or shape != tuple(spec.obs_shape) or not dtype_ok:
            raise ValueError(
                f"{where} has observation space {obs_space}; the model was trained on a Box of shape "
                f"{tuple(spec.obs_shape)} and dtype {spec.obs_dtype}"
            )
    if act_space is None:
        return
    if spec.discrete:
        ok = (
            isinstance(act_space, CATEGORICAL)
            and action_groups(act_space) == tuple(spec.action_groups)
            and tuple(action_starts(act_space).tolist()) == _spec_starts(spec)
        )
    else:
        ok = (
            isinstance(act_space, Box)
            and act_space.shape == (spec.action_dim,)
            and np.allclose(act_space.low, spec.action_low)
            and np.allclose(act_space.high, spec.action_high)
        )
    if not ok:
        raise ValueError(f"{where} has action space {act_space}; the model was trained on {_describe_actions(spec)}")


def spaces_for(
    wm: WorldModel, observation_space: Optional[Space], action_space: Optional[Space], decode_obs: bool
) -> tuple[Box, Space]:
    """The single-env observation and action spaces of a model environment.

    Given real spaces (checked against the model) are used with the model's observation dtype, so decoded
    observations carry the real bounds; without them vector observations are unbounded, pixels are 0..255 uint8, and the
    actions are rebuilt from the model (one categorical group: Discrete, several: MultiDiscrete).
    Latent observations (`decode_obs=False`) are unbounded vectors of the latent width.
    """
    spec = wm.spec
    check_compatible(spec, observation_space, action_space, "the environment given")
    if action_space is None:
        action_space = model_action_space(spec)
    if not decode_obs:
        return Box(-np.inf, np.inf, (wm.latent_dim,), np.float32), action_space
    if observation_space is not None:
        dtype = np.dtype(spec.obs_dtype)
        low, high = observation_space.low.astype(dtype), observation_space.high.astype(dtype)
        return Box(low, high, dtype=dtype), action_space
    if spec.pixels:
        return Box(0, 255, spec.obs_shape, np.uint8), action_space
    return Box(-np.inf, np.inf, spec.obs_shape, np.float32), action_space


def _spec_starts(spec: SpaceSpec) -> tuple[int, ...]:
    """Each categorical group's smallest value in the model's spec (all 0 where it stores none)."""
    return tuple(spec.action_starts) or (0,) * len(spec.action_groups)


def model_action_space(spec: SpaceSpec) -> Space:
    """The action space a model describes: its Box bounds, or Discrete / MultiDiscrete from its one-hot groups
    and their starts."""
    if not spec.discrete:
        return Box(np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32), dtype=np.float32)
    groups, starts = tuple(spec.action_groups), _spec_starts(spec)
    if len(groups) == 1:
        return Discrete(groups[0], start=starts[0])
    return MultiDiscrete(list(groups), start=list(starts))


def check_actions(actions: Any, space: Space, batch: Optional[int]) -> np.ndarray:
    """Validate env actions (one, or `batch` rows) and return the model's float32 actions [B, A].

    A categorical action must hold integers inside the space (one for Discrete, one per entry for
    MultiDiscrete and MultiBinary); a Box action must have the space's shape, hold finite numbers and lie
    within the bounds. Anything else raises a ValueError that says what was wrong.
    """
    a = np.asarray(actions)
    lead = () if batch is None else (batch,)
    shape = (*lead, *space.shape)
    if isinstance(space, CATEGORICAL):
        low = np.asarray(getattr(space, "start", 0))  # MultiBinary entries are 0 or 1
        high = low + (space.nvec if isinstance(space, MultiDiscrete) else space.n if isinstance(space, Discrete) else 2)
        if a.shape != shape or not np.issubdtype(a.dtype, np.integer) or (a.size and ((a < low) | (a >= high)).any()):
            raise ValueError(
                f"expected {type(space).__name__} actions of shape {shape}: integers in "
                f"[{low.tolist()}, {high.tolist()}), got {actions!r}"
            )
    else:
        if a.shape != shape or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"action has shape {a.shape} and dtype {a.dtype}; expected numbers of shape {shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or infinite values: {actions!r}")
        outside = (a < space.low) | (a > space.high)
        if outside.any():
            raise ValueError(
                f"action {a[outside].tolist()} lies outside the action space's bounds "
                f"[{space.low.tolist()}, {space.high.tolist()}]"
            )
    return action_to_model(a if batch is not None else a[None], space)


def format_obs(obs: np.ndarray, space: Box, pixels: bool) -> np.ndarray:
    """Decoded observations in the space's dtype and bounds: pixels rounded to uint8, vectors clipped."""
    if pixels:
        return np.clip(np.rint(np.asarray(obs, np.float64)), 0, 255).astype(np.uint8)
    obs = np.asarray(obs, dtype=np.float32)
    if np.isfinite(space.low).any() or np.isfinite(space.high).any():
        obs = np.clip(obs, space.low, space.high)
    return obs


@dataclass
class ModelStep:
    """One batched model step, read out: the next latents and, per env, everything a step reports."""

    z: Tensor  # [B, Z] next latents
    obs: Optional[np.ndarray]  # [B, *obs] decoded (not yet formatted), or None when not decoding
    reward: np.ndarray  # [B] float64
    continue_prob: np.ndarray  # [B] float32
    loops_used: np.ndarray  # [B] int64
    bound: np.ndarray  # [B] float32, certified distance to the loop's fixed point at exit
    converged: np.ndarray  # [B] bool
    kappa: float


@torch.no_grad()
def model_step(
    wm: WorldModel, z: Tensor, actions: np.ndarray, options: Optional[LoopOptions], decode: bool
) -> ModelStep:
    """Advance latents `z` [B, Z] under model actions [B, A] with one `wm.step`, and read out rewards,
    continues, loop statistics and (when `decode`) observations, each moved to the host once."""
    z, trace = wm.step(z, torch.as_tensor(actions, device=z.device), options=options)
    obs = wm.decode(z).cpu().numpy() if decode else None
    return ModelStep(
        z=z,
        obs=obs,
        reward=wm.predict_reward(z).cpu().numpy().astype(np.float64),
        continue_prob=wm.predict_continue(z).cpu().numpy(),
        loops_used=trace.loops_used.cpu().numpy().astype(np.int64),
        bound=trace.bound.cpu().numpy().astype(np.float32),
        converged=trace.converged.cpu().numpy().astype(bool),
        kappa=float(trace.kappa),
    )
