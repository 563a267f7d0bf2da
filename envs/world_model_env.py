"""`WorldModelEnv`: a Gymnasium environment that steps a learned `WorldModel` instead of the simulator.

Like mbrl-lib's ``ModelEnv`` or TorchRL's ``WorldModelEnv``, but a true ``gymnasium.Env``: it passes
``check_env`` and composes with Gymnasium wrappers, so policies can be trained or evaluated "in
imagination" with ordinary Gymnasium tooling.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, SupportsFloat, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium.spaces import Box, Discrete
from torch import Tensor

from loopwm.envs.factory import action_to_model
from loopwm.loop import LoopOptions
from loopwm.world_model import WorldModel

ResetObs = Union[None, Callable[[np.random.Generator], np.ndarray], np.ndarray]
Action = Union[np.ndarray, int]


class WorldModelEnv(gym.Env[np.ndarray, Action]):
    """A ``gymnasium.Env`` whose dynamics, rewards and terminations are a `WorldModel`'s predictions.

    ``reset`` draws a start observation (from ``reset_obs`` with ``self.np_random``, or given as
    ``options={"obs": obs}``), casts it to the observation space's dtype, encodes it and returns it.
    Each ``step`` runs one ``wm.step`` under ``torch.no_grad`` and returns:

    - the decoded next latent (``decode_obs=True``; float32 vectors, or uint8 ``(C, H, W)`` frames
      rounded and clipped to 0..255), or the latent itself (``decode_obs=False``);
    - the predicted reward, as a float;
    - ``terminated`` when the predicted continue probability is below 0.5;
    - ``truncated`` once ``max_episode_steps`` steps have been taken (never when it is None);
    - ``info`` with ``loops_used`` (int), ``bound`` (float, the certified distance to the loop's
      fixed point at exit), ``converged`` (bool), ``kappa`` (float, the contraction certificate) and
      ``continue_prob`` (float).

    Actions are in the real environment's units. Box actions outside the bounds are **clipped** to
    them (the model clamps its normalised actions to [-1, 1] anyway); a Discrete action outside
    ``[0, n)``, an action of the wrong shape, or a NaN/infinite action raises ``ValueError``.
    The same seed and actions give the same trajectory. The environment never changes the model's
    train/eval mode or parameters.

    Example:
        >>> import gymnasium as gym
        >>> from loopwm import Config, WorldModel
        >>> real = gym.make("Pendulum-v1")
        >>> wm = WorldModel.from_config(Config(), real.observation_space, real.action_space)
        >>> starts = lambda rng: real.reset(seed=int(rng.integers(2**31)))[0]
        >>> env = WorldModelEnv(wm, reset_obs=starts, max_episode_steps=200)
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        >>> sorted(info)
        ['bound', 'continue_prob', 'converged', 'kappa', 'loops_used']
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        wm: WorldModel,
        *,
        reset_obs: ResetObs = None,
        max_episode_steps: Optional[int] = 1000,
        decode_obs: bool = True,
        render_mode: Optional[str] = None,
        options: Optional[LoopOptions] = None,
    ):
        """Wrap ``wm``; ``reset_obs`` is a sampler ``f(np_random) -> obs``, an array of start
        observations ``[N, *obs_shape]`` (or one observation), or None to require ``options["obs"]``.

        ``options`` (a `loopwm.loop.LoopOptions`, e.g. the certified exit) go to every ``wm.step``
        call, as they would to ``wm.imagine``. ``render_mode="rgb_array"`` is available for pixel models only.
        """
        if not isinstance(wm, WorldModel):
            raise TypeError(f"WorldModelEnv needs a loopwm.WorldModel, got {type(wm).__name__}")
        if max_episode_steps is not None and (
                isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int)
                or max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
        spec = wm.spec
        self.metadata = {"render_modes": ["rgb_array"] if spec.pixels else []}
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}: expected one of {self.metadata['render_modes']} "
                             f"or None ({'pixel' if spec.pixels else 'vector'} observations)")
        self.wm = wm
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.decode_obs = decode_obs
        self.options = options
        self.reset_obs = self._check_reset_obs(reset_obs)
        if spec.discrete:
            self.action_space: gym.Space = Discrete(spec.action_dim)
        else:
            self.action_space = Box(np.asarray(spec.action_low, np.float32),
                                    np.asarray(spec.action_high, np.float32), dtype=np.float32)
        if not decode_obs:
            self.observation_space: gym.Space = Box(-np.inf, np.inf, (wm.latent_dim,), np.float32)
        elif spec.pixels:
            self.observation_space = Box(0, 255, spec.obs_shape, np.uint8)
        else:
            self.observation_space = Box(-np.inf, np.inf, spec.obs_shape, np.float32)
        self._z: Optional[Tensor] = None
        self._elapsed = 0

    def _check_reset_obs(self, reset_obs: ResetObs) -> ResetObs:
        """Accept a sampler, None, or an array of start observations (one observation becomes a set of one)."""
        if reset_obs is None or callable(reset_obs):
            return reset_obs
        data = np.asarray(reset_obs)
        shape = tuple(self.wm.spec.obs_shape)
        if data.shape == shape:
            data = data[None]
        if data.ndim != len(shape) + 1 or tuple(data.shape[1:]) != shape or len(data) == 0:
            raise ValueError(f"reset_obs has shape {data.shape}; expected (N, {', '.join(map(str, shape))}) "
                             "start observations with N >= 1, or a callable f(np_random) -> obs")
        if not np.issubdtype(data.dtype, np.number) or not np.all(np.isfinite(data)):
            raise ValueError("reset_obs must hold finite numbers")
        return data

    # ---- gymnasium API -----------------------------------------------------------------
    def reset(
        self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Seed ``np_random``, draw a start observation and encode it; ``options={"obs": obs}`` overrides the draw."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"obs"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; WorldModelEnv accepts only 'obs'")
        obs = self._format(self._start_obs(options.get("obs")))
        with torch.no_grad():
            self._z = self.wm.encode(torch.as_tensor(obs[None], device=self._device))
        self._elapsed = 0
        return (obs if self.decode_obs else self._latent_obs()), {}

    def step(self, action: Action) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Advance the latent one environment step with ``wm.step`` and read out obs, reward and flags."""
        if self._z is None:
            raise gym.error.ResetNeeded("WorldModelEnv: call reset() before step()")
        a = torch.as_tensor(action_to_model(self._check_action(action)[None], self.action_space),
                            device=self._device)
        with torch.no_grad():
            z, trace = self.wm.step(self._z, a, options=self.options)
            reward = float(self.wm.predict_reward(z)[0])
            cont = float(self.wm.predict_continue(z)[0])
            obs = self._format(self.wm.decode(z)[0].cpu().numpy()) if self.decode_obs else None
        self._z = z
        self._elapsed += 1
        truncated = self.max_episode_steps is not None and self._elapsed >= self.max_episode_steps
        info = {
            "loops_used": int(trace.loops_used[0]),
            "bound": float(trace.bound[0]),
            "converged": bool(trace.converged[0]),
            "kappa": float(trace.kappa),
            "continue_prob": cont,
        }
        return (obs if obs is not None else self._latent_obs()), reward, cont < 0.5, truncated, info

    def render(self) -> Optional[np.ndarray]:
        """The decoded current frame as H x W x 3 uint8: RGB when C == 3, else the last channel in grey."""
        if self.render_mode is None:
            gym.logger.warn("WorldModelEnv.render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        if self._z is None:
            raise gym.error.ResetNeeded("WorldModelEnv: call reset() before render()")
        with torch.no_grad():
            frame = self._format(self.wm.decode(self._z)[0].cpu().numpy())
        rgb = frame if frame.shape[0] == 3 else np.repeat(frame[-1:], 3, axis=0)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0))

    # ---- helpers -----------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        """Where the model lives now (it may have been moved since construction)."""
        return self.wm.device

    def _start_obs(self, given: Optional[np.ndarray]) -> np.ndarray:
        """The observation an episode starts from: given, sampled with ``np_random``, or an error."""
        if given is not None:
            obs = np.asarray(given)
        elif self.reset_obs is None:
            raise ValueError("WorldModelEnv has no start observations: pass reset_obs=... to the constructor "
                             "or reset(options={'obs': obs})")
        elif callable(self.reset_obs):
            obs = np.asarray(self.reset_obs(self.np_random))
        else:
            obs = self.reset_obs[int(self.np_random.integers(len(self.reset_obs)))]
        shape = tuple(self.wm.spec.obs_shape)
        if obs.shape != shape:
            raise ValueError(f"start observation has shape {obs.shape}; expected {shape}")
        if not np.issubdtype(obs.dtype, np.number) or not np.all(np.isfinite(obs)):
            raise ValueError("start observation must hold finite numbers")
        return obs

    def _check_action(self, action: Action) -> np.ndarray:
        """Validate an env action; Box actions are clipped to the bounds, anything else invalid raises."""
        a = np.asarray(action)
        if isinstance(self.action_space, Discrete):
            n = int(self.action_space.n)
            if a.shape != () or not np.issubdtype(a.dtype, np.integer) or not 0 <= int(a) < n:
                raise ValueError(f"Discrete action must be an integer in [0, {n}), got {action!r}")
            return a.astype(np.int64)
        if a.shape != self.action_space.shape or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"action has shape {a.shape} and dtype {a.dtype}; "
                             f"expected numbers of shape {self.action_space.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or infinite values: {action!r}")
        return np.clip(a, self.action_space.low, self.action_space.high)

    def _format(self, obs: np.ndarray) -> np.ndarray:
        """A fresh copy in the observation space's dtype: float32, or rounded and clipped uint8 frames."""
        if self.wm.spec.pixels:
            return np.clip(np.rint(np.asarray(obs, np.float64)), 0, 255).astype(np.uint8)
        return np.array(obs, dtype=np.float32)

    def _latent_obs(self) -> np.ndarray:
        return self._z[0].detach().cpu().numpy().astype(np.float32)
