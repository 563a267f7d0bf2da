"""Environment families: one builder per family (classic control, MuJoCo, Atari).

Each family makes its environments with the wrappers they need and says how their observations are laid
out in a replay buffer (Atari stores single frames and rebuilds stacks). `family_of` is the one place that
tells which family an env id belongs to; a new family is one class here plus one line in `FAMILIES`.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec, load_env_creator, parse_env_id
from gymnasium.spaces import Box
from gymnasium.wrappers import (
    AtariPreprocessing,
    FrameStackObservation,
    TimeLimit,
    TransformObservation,
    TransformReward,
)

from loopwm.config import EnvConfig


@dataclass(frozen=True)
class ReplayLayout:
    """How a family's observations are stored: with `frame_stack` = S > 1 each observation is a stack of S
    frames, of which the replay buffer keeps only the newest per step."""

    frame_stack: int = 1


def env_spec(env_id: str) -> EnvSpec:
    """Look up a registered environment, suggesting close ids when it is unknown."""
    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown environment id {env_id!r}{hint} ({exc})") from None


def _to_float32(obs: np.ndarray) -> np.ndarray:
    return obs.astype(np.float32)


def _gym_make(cfg: EnvConfig, render_mode: Optional[str]) -> gym.Env:
    """`gym.make` of a registered id; float64 observations are cast to float32, the dtype the model trains in."""
    env_spec(cfg.id)
    env = gym.make(cfg.id, render_mode=render_mode, max_episode_steps=cfg.max_episode_steps)
    space = env.observation_space
    if isinstance(space, Box) and space.dtype == np.float64:
        bounds = (space.low.astype(np.float32), space.high.astype(np.float32))
        env = TransformObservation(env, _to_float32, Box(*bounds, dtype=np.float32))
    return env


class EnvFamily:
    """A family of environments. `make` builds one (unseeded; `make_env` adds the generic wrappers and seeds
    it), `layout` is the replay layout it needs. `requires` are the modules the family's pip `extra` brings."""

    name: str = ""
    extra: str = ""
    requires: tuple[str, ...] = ()
    what: str = ""

    def matches(self, env_id: str) -> bool:
        raise NotImplementedError

    def make(self, cfg: EnvConfig, render_mode: Optional[str], training: bool) -> gym.Env:
        raise NotImplementedError

    def layout(self, cfg: EnvConfig) -> ReplayLayout:
        return ReplayLayout()

    def require(self, env_id: str) -> list[ModuleType]:
        """Import the family's optional dependencies, or fail with the pip extra that provides them."""
        try:
            return [importlib.import_module(module) for module in self.requires]
        except ImportError as exc:
            raise self.missing(env_id, exc) from exc

    def missing(self, env_id: str, exc: BaseException) -> ImportError:
        return ImportError(f"{env_id} needs {self.what}: pip install 'loopwm[{self.extra}]' ({exc})")


class ClassicControl(EnvFamily):
    """Gymnasium's classic control tasks, and any other registered env with supported spaces (Box2D, your own)."""

    name = "classic"

    def matches(self, env_id: str) -> bool:
        return True  # the fallback: asked last

    def make(self, cfg: EnvConfig, render_mode: Optional[str], training: bool) -> gym.Env:
        return _gym_make(cfg, render_mode)


class MuJoCo(EnvFamily):
    """MuJoCo tasks: envs whose class derives from Gymnasium's `MujocoEnv` (the v5 suite, or your own)."""

    name, extra, requires, what = "mujoco", "mujoco", ("mujoco",), "MuJoCo"

    def matches(self, env_id: str) -> bool:
        entry = env_spec(env_id).entry_point
        creator = load_env_creator(entry) if isinstance(entry, str) else entry
        base = sys.modules.get("gymnasium.envs.mujoco.mujoco_env")  # imported by any MujocoEnv subclass
        return isinstance(creator, type) and base is not None and issubclass(creator, base.MujocoEnv)

    def make(self, cfg: EnvConfig, render_mode: Optional[str], training: bool) -> gym.Env:
        self.require(cfg.id)
        return _gym_make(cfg, render_mode)


class Atari(EnvFamily):
    """The Arcade Learning Environment (`ALE/*` ids) with the standard preprocessing (Machado et al. 2018):
    no-op starts, frame skip, grayscale `screen_size` frames stacked `frame_stack` deep, sticky actions, and
    sign-clipped rewards in training only. Settings are `env.atari.*`."""

    name, extra, requires, what = "atari", "atari", ("ale_py", "cv2"), "the Arcade Learning Environment and OpenCV"

    def matches(self, env_id: str) -> bool:
        try:
            return parse_env_id(env_id)[0] == "ALE"
        except gym.error.Error:
            return False

    def make(self, cfg: EnvConfig, render_mode: Optional[str], training: bool) -> gym.Env:
        ale_py, _ = self.require(cfg.id)
        gym.register_envs(ale_py)
        env_spec(cfg.id)
        a = cfg.atari
        env = gym.make(
            cfg.id,
            frameskip=1,
            repeat_action_probability=a.sticky_actions,
            full_action_space=a.full_action_space,
            render_mode=render_mode,
        )
        env = AtariPreprocessing(
            env,
            noop_max=a.noop_max,
            frame_skip=a.frame_skip,
            screen_size=a.screen_size,
            terminal_on_life_loss=a.terminal_on_life_loss,
            grayscale_obs=True,
        )
        if cfg.max_episode_steps is not None:
            env = TimeLimit(env, cfg.max_episode_steps)
        env = FrameStackObservation(env, a.frame_stack)
        if training and a.clip_rewards:
            env = TransformReward(env, np.sign)
        return env

    def layout(self, cfg: EnvConfig) -> ReplayLayout:
        return ReplayLayout(frame_stack=cfg.atari.frame_stack)


FAMILIES: dict[str, EnvFamily] = {family.name: family for family in (Atari(), MuJoCo(), ClassicControl())}
"""The env families in the order they are asked; the first that matches an id builds it."""


def _missing_module(exc: BaseException) -> Optional[str]:
    """The top-level module whose import failed somewhere in `exc`'s chain of causes, if any."""
    while exc is not None:
        if isinstance(exc, ImportError) and exc.name:
            return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def family_of(env_id: str) -> EnvFamily:
    """The family that builds `env_id`. An env whose module cannot be imported for want of a family's
    dependency is named with that family's pip extra."""
    try:
        return next(family for family in FAMILIES.values() if family.matches(env_id))
    except (ImportError, gym.error.DependencyNotInstalled) as exc:
        missing = _missing_module(exc)
        for family in FAMILIES.values():
            if missing in family.requires:
                raise family.missing(env_id, exc) from exc
        raise
