"""Planning agents and the online RL loop."""
from .planner import Planner, discounted_return
from .value import PolicyPrior, ValueFunction

__all__ = ["Planner", "PolicyPrior", "ValueFunction", "discounted_return"]
