"""Stability analyses of trained looped world models.

The maths modules (jacobian, convergence, agreement, cycles, geometry, rollout, stats, fit) and `prediction`
(open-loop errors next to baselines) need only torch and numpy. The report entry points below draw figures with
matplotlib and are imported on first use. Analysis reads models and data only: loading checkpoints and datasets
for `loopwm analyze` is the application layer's job (`loopwm.app.analyze`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "analyze": "loopwm.analysis.report",
    "Settings": "loopwm.analysis.sections",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loopwm.analysis' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
