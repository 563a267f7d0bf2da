"""`WorldModelEnv`: a Gymnasium environment that steps a learned `WorldModel` instead of the simulator.

Like mbrl-lib's ``ModelEnv`` or TorchRL's ``WorldModelEnv``, but a true ``gymnasium.Env``: it passes
``check_env`` and composes with Gymnasium wrappers, so policies can be trained or evaluated "in
imagination" with ordinary Gymnasium tooling. `VectorWorldModelEnv` steps many of them in one forward.
"""

from __future__ import annotations

from typing import Any, Optional, SupportsFloat, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium.spaces import Space
from torch import Tensor

from loopwm.envs.model_io import check_actions, format_obs, model_step, spaces_for
from loopwm.envs.starts import Starts, StartSource, check_obs
from loopwm.exits import LoopOptions
from loopwm.world_model import WorldModel

Action = Union[np.ndarray, int]


def check_episode_steps(max_episode_steps: Optional[int]) -> Optional[int]:
    """An episode length limit: an integer >= 1, or None for none."""
    if max_episode_steps is not None and (
        isinstance(max_episode_steps, bool)
        or not isinstance(max_episode_steps, (int, np.integer))
        or max_episode_steps < 1
    ):
        raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
    return None if max_episode_steps is None else int(max_episode_steps)


class WorldModelEnv(gym.Env[np.ndarray, Action]):
    """A ``gymnasium.Env`` whose dynamics, rewards and terminations are a `WorldModel`'s predictions.

    ``reset`` draws a start observation (from ``reset_obs`` with ``self.np_random``, or given as
    ``options={"obs": obs}``), encodes it and returns it. Each ``step`` runs one ``wm.step`` under
    ``torch.no_grad`` and returns:

    - the decoded next latent (``decode_obs=True``; float32 vectors clipped to the observation space's
      bounds, or uint8 ``(C, H, W)`` frames rounded and clipped to 0..255), or the latent itself;
    - the predicted reward, as a float;
    - ``terminated`` when the predicted continue probability is below 0.5;
    - ``truncated`` once ``max_episode_steps`` steps have been taken (never when it is None);
    - ``info`` with ``loops_used`` (int), ``bound`` (float, the certified distance to the loop's fixed
      point at exit), ``converged`` (bool), ``kappa`` (float, the contraction certificate) and
      ``continue_prob`` (float).

    Pass the real environment's ``observation_space`` (and ``action_space``) to get its bounds; they are
    checked against the model. Actions are in the real environment's units; an action outside the space
    (out of bounds, wrong shape, NaN, a Discrete index out of range) raises ``ValueError``, as does a NaN
    start observation. The same seed and actions give the same trajectory. The environment never changes
    the model's train/eval mode or parameters.

    Example:
        >>> import gymnasium as gym
        >>> from loopwm import Config, WorldModel
        >>> real = gym.make("Pendulum-v1")
        >>> wm = WorldModel.from_config(Config(), real.observation_space, real.action_space)
        >>> env = WorldModelEnv(wm, reset_obs=real, observation_space=real.observation_space)
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
        reset_obs: StartSource = None,
        observation_space: Optional[Space] = None,
        action_space: Optional[Space] = None,
        max_episode_steps: Optional[int] = 1000,
        decode_obs: bool = True,
        render_mode: Optional[str] = None,
        options: Optional[LoopOptions] = None,
    ):
        """Wrap ``wm``; ``reset_obs`` is where episodes start (see `Starts`: a ReplayBuffer, a dataset
        path, an array ``[N, *obs_shape]``, a real environment, a sampler ``f(np_random) -> obs``, or None
        to require ``options["obs"]``).

        ``options`` (a `loopwm.exits.LoopOptions`, e.g. the certified exit) go to every ``wm.step`` call,
        as they would to ``wm.imagine``. ``render_mode="rgb_array"`` is available for pixel models only.
        """
        if not isinstance(wm, WorldModel):
            raise TypeError(f"WorldModelEnv needs a loopwm.WorldModel, got {type(wm).__name__}")
        spec = wm.spec
        # the model has no clock of its own; 30 fps is how rendered frames are paced
        self.metadata = {"render_modes": ["rgb_array"] if spec.pixels else [], "render_fps": 30}
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r}: expected one of {self.metadata['render_modes']} "
                f"or None ({'pixel' if spec.pixels else 'vector'} observations)"
            )
        self.wm = wm
        self.render_mode = render_mode
        self.max_episode_steps = check_episode_steps(max_episode_steps)
        self.decode_obs = decode_obs
        self.options = options
        self.starts = Starts(reset_obs, spec.obs_shape)
        self._obs_bounds, self.action_space = spaces_for(wm, observation_space, action_space, True)
        self.observation_space = spaces_for(wm, observation_space, action_space, decode_obs)[0]
        self._z: Optional[Tensor] = None
        self._elapsed = 0

    # ---- gymnasium API -----------------------------------------------------------------
    def reset(
        self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Seed ``np_random``, draw a start observation and encode it; ``options={"obs": obs}`` overrides the draw.

        Options are checked first, so a bad one (an unknown key, a NaN observation) changes nothing."""
        options = dict(options or {})
        unknown = sorted(set(options) - {"obs"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; WorldModelEnv accepts only 'obs'")
        given = options.get("obs")
        if given is not None:
            given = check_obs(given, tuple(self.wm.spec.obs_shape), "start observation")
        super().reset(seed=seed)
        obs = given if given is not None else self.starts.draw(self.np_random)
        obs = self._format(obs)
        with torch.no_grad():
            self._z = self.wm.encode(torch.as_tensor(obs[None], device=self.wm.device))
        self._elapsed = 0
        return (obs if self.decode_obs else self._latent_obs()), {}

    def step(self, action: Action) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Advance the latent one environment step with ``wm.step`` and read out obs, reward and flags."""
        if self._z is None:
            raise gym.error.ResetNeeded("WorldModelEnv: call reset() before step()")
        out = model_step(
            self.wm, self._z, check_actions(action, self.action_space, None), self.options, self.decode_obs
        )
        self._z = out.z
        self._elapsed += 1
        truncated = self.max_episode_steps is not None and self._elapsed >= self.max_episode_steps
        cont = float(out.continue_prob[0])
        info = {
            "loops_used": int(out.loops_used[0]),
            "bound": float(out.bound[0]),
            "converged": bool(out.converged[0]),
            "kappa": out.kappa,
            "continue_prob": cont,
        }
        obs = self._format(out.obs[0]) if self.decode_obs else self._latent_obs()
        return obs, float(out.reward[0]), cont < 0.5, truncated, info

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

    def close(self) -> None:
        """Close the start environment, if episodes start from one."""
        self.starts.close()

    # ---- helpers -----------------------------------------------------------------------
    def _format(self, obs: np.ndarray) -> np.ndarray:
        """A fresh copy in the observation space's dtype and bounds."""
        return np.array(format_obs(obs, self._obs_bounds, self.wm.spec.pixels))

    def _latent_obs(self) -> np.ndarray:
        return self._z[0].detach().cpu().numpy().astype(np.float32)
