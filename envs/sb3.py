"""`SB3VecEnv`: a `VectorWorldModelEnv` seen by stable-baselines3 as one of its own `VecEnv`s.

stable-baselines3 refuses Gymnasium vector envs and wraps single envs in a DummyVecEnv, which steps
them one by one. This adapter hands SB3 the batched model env directly: actions go in as one array,
observations, rewards and dones come back as one array each from one model forward, and nothing is
copied per environment except the small info dicts SB3's API requires (empty unless an episode ended).

    from stable_baselines3 import PPO
    from loopwm.envs import VectorWorldModelEnv
    from loopwm.envs.sb3 import SB3VecEnv

    venv = VectorWorldModelEnv(wm, 64, reset_obs=buffer, observation_space=real.observation_space,
                               action_space=real.action_space, autoreset_mode="SameStep")
    PPO("MlpPolicy", SB3VecEnv(venv)).learn(10_000)

stable-baselines3 is an optional dependency: ``pip install 'loopwm[examples]'``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode

from loopwm.envs.vector_world_model_env import VectorWorldModelEnv

try:
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"loopwm.envs.sb3 needs stable-baselines3: pip install 'loopwm[examples]' ({exc})") from exc


class SB3VecEnv(VecEnv):
    """SB3's `VecEnv` API over one `VectorWorldModelEnv` built with ``autoreset_mode=SAME_STEP``.

    SB3 resets finished envs within the step and reports the last observation as
    ``infos[i]["terminal_observation"]``, with ``infos[i]["TimeLimit.truncated"]`` for time limits; that is
    Gymnasium's SAME_STEP autoreset, so the adapter only renames. The loop statistics of the last step
    (loops used, certified bound, convergence, κ) stay batched in `last_info`.
    """

    def __init__(self, venv: VectorWorldModelEnv):
        if not isinstance(venv, VectorWorldModelEnv):
            raise TypeError(f"SB3VecEnv wraps a loopwm VectorWorldModelEnv, got {type(venv).__name__}")
        if venv.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3VecEnv needs a VectorWorldModelEnv with autoreset_mode=SAME_STEP (SB3's own "
                f"convention), got {venv.autoreset_mode.value}"
            )
        self.venv = venv
        self.last_info: dict[str, Any] = {}
        self._actions: Optional[np.ndarray] = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    def reset(self) -> np.ndarray:
        """Reset every env with the seeds given to `seed()` (env i: seed + i) and the start observations given to
        `set_options` (``{"obs": obs}`` per env, or one dict for all), then forget both as SB3 does."""
        seed = self._seeds[0]
        obs, _ = self.venv.reset(seed=None if seed is None else [int(s) for s in self._seeds], options=self._starts())
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def _starts(self) -> Optional[dict[str, np.ndarray]]:
        """The batched reset options of the per-env ones set with `set_options`: every env's start, or none."""
        options = [dict(o or {}) for o in self._options]
        if not any(options):
            return None
        if any(set(o) != {"obs"} for o in options):
            raise ValueError(
                f"SB3VecEnv.set_options: every env needs exactly {{'obs': start observation}}, got {options!r}; "
                "the model env's other reset option, reset_mask, is SB3's to manage"
            )
        return {"obs": np.stack([np.asarray(o["obs"]) for o in options])}

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """One batched model step; finished envs are already reset, their last observation in the infos."""
        actions, self._actions = self._actions, None
        obs, rewards, terminated, truncated, info = self.venv.step(actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            infos[i] = {
                "terminal_observation": info["final_obs"][i],
                "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
            }
        self.last_info = info
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    # SB3 addresses sub-envs by index for these; the batched env has one set of attributes and methods
    # for all, so a method runs once and its result stands for every index asked for.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> Sequence[bool]:
        return [False for _ in self._get_indices(indices)]
