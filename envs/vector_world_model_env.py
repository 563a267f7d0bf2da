"""`VectorWorldModelEnv`: N imagined environments stepped in one batched `wm.step` forward.

A real ``gymnasium.vector.VectorEnv`` (Gymnasium 1.x), so vector-aware libraries see one environment
of batch N rather than N Python objects: one model forward per step whatever N is.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium.spaces import Space
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from loopwm.envs.model_io import check_actions, format_obs, model_step, spaces_for
from loopwm.envs.starts import Starts, StartSource, check_obs
from loopwm.envs.world_model_env import check_episode_steps
from loopwm.exits import LoopOptions
from loopwm.world_model import WorldModel

Seed = Union[None, int, Sequence[Optional[int]]]


class VectorWorldModelEnv(gym.vector.VectorEnv):
    """``num_envs`` model environments, stepped together in one forward of ``wm.step``.

    Each sub-environment behaves as a `WorldModelEnv` with the same arguments: ``reset(seed=s)`` seeds
    env i with ``s + i`` and draws its start observation with that generator, so env 0 of a vector env
    and a `WorldModelEnv` reset with the same seed follow the same trajectory (exactly at ``num_envs=1``; with
    more envs up to float rounding, since a larger batch may sum its matmuls in another order). Start observations come
    from ``reset_obs`` (see `Starts`: a ReplayBuffer, a dataset path, an array, a real environment or a
    sampler), or ``options={"obs": [N, *obs_shape]}``.

    Autoreset (``autoreset_mode``, Gymnasium's semantics, stored in ``metadata["autoreset_mode"]``):
    - ``NEXT_STEP`` (default): the step after an env terminates or truncates resets it, ignoring its
      action, and returns its start observation with reward 0 and both flags False; its loop statistics
      in ``info`` are masked off (``info["_loops_used"][i]`` is False).
    - ``SAME_STEP``: an env that ends is reset within the same step; the returned observation is the new
      start, and ``info["final_obs"]`` (an object array, None elsewhere) and ``info["final_info"]`` hold
      the last observation and step info, marked by ``info["_final_obs"]``.
    - ``DISABLED``: nothing resets by itself; stepping an env that ended raises, and
      ``reset(options={"reset_mask": mask})`` resets the masked envs only.

    ``info`` holds, per env, ``loops_used`` (int64), ``bound`` (float32, the certified distance to the
    loop's fixed point at exit), ``converged`` (bool), ``continue_prob`` and ``kappa`` (the model's
    certificate, the same for every env), each with its Gymnasium ``_key`` mask. Actions are a batch in
    the real environment's units: ``(N, *shape)`` for Box, ``(N,)`` integers for Discrete; any action
    outside the space raises ``ValueError`` before the model is stepped.
    """

    def __init__(
        self,
        wm: WorldModel,
        num_envs: int,
        *,
        reset_obs: StartSource = None,
        observation_space: Optional[Space] = None,
        action_space: Optional[Space] = None,
        max_episode_steps: Optional[int] = 1000,
        decode_obs: bool = True,
        autoreset_mode: Union[str, AutoresetMode] = AutoresetMode.NEXT_STEP,
        options: Optional[LoopOptions] = None,
    ):
        """Batch ``num_envs`` imagined environments of ``wm``; the other arguments are `WorldModelEnv`'s."""
        if not isinstance(wm, WorldModel):
            raise TypeError(f"VectorWorldModelEnv needs a loopwm.WorldModel, got {type(wm).__name__}")
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        try:
            self.autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(
                f"autoreset_mode={autoreset_mode!r}: expected one of {[m.value for m in AutoresetMode]}"
            ) from None
        self.wm, self.num_envs = wm, int(num_envs)
        self.max_episode_steps = check_episode_steps(max_episode_steps)
        self.decode_obs = decode_obs
        self.options = options
        self.starts = Starts(reset_obs, wm.spec.obs_shape)
        self.metadata = {"autoreset_mode": self.autoreset_mode, "render_modes": []}
        self._obs_bounds, self.single_action_space = spaces_for(wm, observation_space, action_space, True)
        self.single_observation_space = spaces_for(wm, observation_space, action_space, decode_obs)[0]
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs: list[np.random.Generator] = []
        self._z: Optional[torch.Tensor] = None
        self._obs: Optional[np.ndarray] = None
        self._elapsed = np.zeros(self.num_envs, np.int64)
        self._ended = np.zeros(self.num_envs, bool)  # the env's last step terminated or truncated

    # ---- gymnasium API -----------------------------------------------------------------
    def reset(self, *, seed: Seed = None, options: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, dict]:
        """Reset every env (or those in ``options["reset_mask"]``): seed env i with ``seed + i`` (or
        ``seed[i]``), draw its start observation, encode the batch. ``options["obs"]`` gives the starts."""
        options = dict(options or {})
        unknown = sorted(set(options) - {"obs", "reset_mask"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; VectorWorldModelEnv accepts 'obs' and 'reset_mask'")
        mask = self._reset_mask(options.get("reset_mask"))
        seeds = self._seeds(seed)
        if self._z is None and not mask.all():
            raise gym.error.ResetNeeded("VectorWorldModelEnv: the first reset must reset every env (no reset_mask)")
        given = options.get("obs")
        if given is not None:  # checked before anything changes, so a bad start leaves the envs as they were
            given = check_obs(given, tuple(self.wm.spec.obs_shape), "options['obs']", batched=True, rows=self.num_envs)
        if seeds[0] is not None or not self._rngs:
            rngs = [seeding.np_random(s)[0] for s in seeds]
            self._rngs = rngs if not self._rngs else [r if m else old for r, old, m in zip(rngs, self._rngs, mask)]
            if seeds[0] is not None:
                self._np_random, self._np_random_seed = seeding.np_random(seeds[0])
        self._restart(np.flatnonzero(mask), given)
        return self._observations(), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One batched model step for all envs, with autoreset as ``autoreset_mode`` says."""
        if self._z is None:
            raise gym.error.ResetNeeded("VectorWorldModelEnv: call reset() before step()")
        model_actions = check_actions(actions, self.single_action_space, self.num_envs)
        mode = self.autoreset_mode
        if mode == AutoresetMode.DISABLED and self._ended.any():
            raise gym.error.ResetNeeded(
                f"VectorWorldModelEnv: envs {np.flatnonzero(self._ended).tolist()} ended and autoreset is disabled; "
                "call reset(options={'reset_mask': mask}) for them first"
            )
        restarting = self._ended.copy() if mode == AutoresetMode.NEXT_STEP else np.zeros(self.num_envs, bool)
        out = model_step(self.wm, self._z, model_actions, self.options, self.decode_obs)
        self._z = out.z
        self._obs = format_obs(out.obs, self._obs_bounds, self.wm.spec.pixels) if self.decode_obs else None
        self._elapsed += 1
        terminated = out.continue_prob < 0.5
        truncated = (
            self._elapsed >= self.max_episode_steps
            if self.max_episode_steps is not None
            else np.zeros(self.num_envs, bool)
        )
        rewards = out.reward
        stepped = ~restarting
        info = {
            "loops_used": out.loops_used,
            "bound": out.bound,
            "converged": out.converged,
            "continue_prob": out.continue_prob,
            "kappa": np.full(self.num_envs, out.kappa, np.float64),
        }
        if restarting.any():
            self._restart(np.flatnonzero(restarting), None)
            rewards = np.where(restarting, 0.0, rewards)
            terminated, truncated = terminated & stepped, truncated & stepped
            for key in list(info):
                info[key] = np.where(restarting, np.zeros_like(info[key]), info[key])
        info.update({f"_{key}": stepped.copy() for key in list(info)})
        self._ended = terminated | truncated
        if mode == AutoresetMode.SAME_STEP and self._ended.any():
            done = np.flatnonzero(self._ended)
            final_obs = np.full(self.num_envs, None, dtype=object)
            last = self._observations()
            for i in done:
                final_obs[i] = last[i]
            info["final_obs"], info["_final_obs"] = final_obs, self._ended.copy()
            final_info = {k: v for k, v in info.items() if not k.startswith(("final", "_final"))}
            for key in [k for k in final_info if k.startswith("_")]:  # as SyncVectorEnv: set for ended envs only
                final_info[key] = final_info[key] & self._ended
            info["final_info"] = final_info
            info["_final_info"] = self._ended.copy()
            self._restart(done, None)
            self._ended[:] = False
        return self._observations(), rewards, terminated, truncated, info

    def close_extras(self, **kwargs: Any) -> None:
        """Close the start environment, if episodes start from one made for this env."""
        self.starts.close()

    # ---- helpers -----------------------------------------------------------------------
    def _seeds(self, seed: Seed) -> list[Optional[int]]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs or (any(s is None for s in seeds) and not all(s is None for s in seeds)):
            raise ValueError(f"seed must be None, an int or a list of {self.num_envs} ints, got {seed!r}")
        return seeds

    def _reset_mask(self, mask: Any) -> np.ndarray:
        if mask is None:
            return np.ones(self.num_envs, bool)
        mask = np.asarray(mask)
        if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
            raise ValueError(
                f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with at least "
                f"one True, got {mask!r}"
            )
        return mask

    def _restart(self, rows: np.ndarray, given: Optional[np.ndarray]) -> None:
        """Start new episodes in envs `rows`: draw (or take) start observations and encode them in one batch."""
        if len(rows) == 0:
            return
        shape = tuple(self.wm.spec.obs_shape)
        starts = given[rows] if given is not None else np.stack([self.starts.draw(self._rngs[i]) for i in rows])
        starts = format_obs(starts, self._obs_bounds, self.wm.spec.pixels)
        with torch.no_grad():
            z = self.wm.encode(torch.as_tensor(starts, device=self.wm.device))
        if self._z is None:
            self._z = z.new_zeros((self.num_envs, z.shape[-1]))
            self._obs = np.zeros((self.num_envs, *shape), starts.dtype) if self.decode_obs else None
        index = torch.as_tensor(rows, device=z.device)
        self._z = self._z.index_copy(0, index, z)
        if self.decode_obs:
            self._obs[rows] = starts
        self._elapsed[rows] = 0
        self._ended[rows] = False

    def _observations(self) -> np.ndarray:
        """The current batch of observations (decoded, or latents); a fresh array each call."""
        if self.decode_obs:
            return self._obs.copy()
        return self._z.cpu().numpy().astype(np.float32)
