"""loopwm: looped latent world models with a certified contraction, for Gymnasium environments.

Public names are imported lazily so that `import loopwm` (and the CLI's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "WorldModel": "loopwm.world_model",
    "ImagineOutput": "loopwm.world_model",
    "LoopTrace": "loopwm.loop",
    "LoopCore": "loopwm.loop",
    "Config": "loopwm.config",
    "ConfigError": "loopwm.config",
    "load_config": "loopwm.config",
    "save": "loopwm.checkpoint",
    "load": "loopwm.checkpoint",
    "CheckpointError": "loopwm.checkpoint",
    "ReplayBuffer": "loopwm.replay",
    "DataError": "loopwm.replay_io",
    # the agents layer, exposed here as the public facade (imported only when asked for)
    "load_agent": "loopwm.agents.planning_agent",
    "PlanningAgent": "loopwm.agents.planning_agent",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("envs", "agents", "analysis"):
        return importlib.import_module(f"loopwm.{name}")
    raise AttributeError(f"module 'loopwm' has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["__version__"]
