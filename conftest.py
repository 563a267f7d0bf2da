"""Let pytest import `loopwm.envs` and `loopwm.agents` from a source checkout without an install."""
import os

import loopwm

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in loopwm.__path__:
    loopwm.__path__.append(_ROOT)
