"""Planning agents and the online RL loop."""
from .planner import Planner, discounted_return
from .planning_agent import PlanningAgent, load_agent
from .value import PolicyPrior, ValueFunction

__all__ = ["Planner", "PlanningAgent", "PolicyPrior", "ValueFunction", "discounted_return", "load_agent"]
